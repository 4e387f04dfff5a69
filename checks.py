"""Validation of what a run is given: data, vocabulary, checkpoints, flags and the run directory.

Every mistake is reported as one line, `<file or flag>: <problem>; <fix>`, by an `SGRAFError`
raised before hours of compute are spent, and without writing to any file the user already
has. The command-line mains are wrapped in `exit_on_error`: it prints
`error: <message>` to stderr and exits with the error's code (2 for usage, data, vocabulary,
checkpoint and run-directory errors, as argparse does; 1 for a run that diverged). Library
functions raise and never exit.

This is the bottom of the project's imports (it imports only `vocab`): the data, checkpoint and
matcher files call it, and it knows no matcher; what is specific to one (its flags, its checkpoint
layout, the number of regions it needs) reaches it as arguments.

All messages are defined in `PROBLEMS` below; `TROUBLESHOOTING.md` is generated from them:
    python checks.py --table > TROUBLESHOOTING.md
Two more commands:
    python checks.py --features data/f30k_precomp/train_ims.npy   # every image finite, shape
    python checks.py --convert-py2 OLD.pth.tar NEW.pth.tar         # python2.7-branch checkpoint

Decisions:
- Caption bytes that are not UTF-8 are replaced (U+FFFD, which maps to <unk>) with a warning
  naming the first such line, not refused: a bad byte costs one word, and the line still
  holds its caption, so no pair shifts. Empty lines are refused: an empty line is a lost
  caption, and every later (image, caption) pair shifts.
- NaN/Inf in the features is checked at start-up on a sample of `N_SAMPLE_IMAGES` images
  (the files are up to 8 GB); `python checks.py --features FILE` checks every image, as
  np2h.py does while it converts.
- A checkpoint is loaded with `torch.load(weights_only=True)`: a pickled global other than
  tensors, plain containers and argparse.Namespace is refused by torch's unpickler before
  anything is called; the refusal names the global.
"""
import argparse
import functools
import logging
import math
import os
import pickletools
import re
import sys
import warnings
import zipfile
from collections import namedtuple

import numpy as np
import torch

from vocab import SPECIAL_TOKENS, deserialize_vocab, encode_caption_with_oov

log = logging.getLogger(__name__)

# images whose features are checked for NaN/Inf at start-up, evenly spaced over the file
N_SAMPLE_IMAGES = 8
# captions tokenised for the out-of-vocabulary report when a split is loaded
N_SAMPLE_CAPTIONS = 5000
# above this share of <unk> tokens the vocabulary is probably of another dataset
OOV_WARN = 0.10


# ----------------------------------------------------------------------------- errors

class SGRAFError(Exception):
    """A mistake in what the run was given; the message is one line: `where: problem; fix`."""
    exit_code = 2

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


class UsageError(SGRAFError):
    """Inconsistent or out-of-range command-line flags."""


class RunExistsError(UsageError):
    """`--model_name` already holds another run's checkpoints."""


class DataError(SGRAFError):
    """Missing or malformed dataset files (`data.DataError` is this class)."""


class VocabError(SGRAFError):
    """A vocabulary file that is missing, malformed or of another dataset."""


class CheckpointError(SGRAFError):
    """A checkpoint that cannot be used (`checkpoint.CheckpointError` is this class)."""


class DivergedError(SGRAFError):
    """The loss or the gradients stopped being finite during training."""
    exit_code = 1


class Warn:
    """Not an error: the problem is logged as a warning and the run goes on."""
    exit_code = None


class Info:
    """Not an error: logged once when a split is loaded."""
    exit_code = None


Problem = namedtuple("Problem", "cls problem fix")

# the fix of a --bert_path that gives no usable BERT
BERT_FIX = ("pass --bert_path DIR, a directory holding a BERT's config.json and vocab.txt (and "
            "its weights, to train from them), e.g. a copy of bert-base-uncased")

# key -> (class, problem, fix). The message is "{where}: {problem}; {fix}" with the fields
# formatted in; TROUBLESHOOTING.md shows the templates.
PROBLEMS = {
    # --------------------------------------------------------------- data
    "data_dir": Problem(
        DataError, "dataset directory not found",
        "pass --data_path DIR and --data_name NAME so that DIR/NAME/ holds {expected} "
        "(train and dev to train; test or testall to evaluate)"),
    "split_missing": Problem(
        DataError, "{missing} not found (the directory holds: {found})",
        "download or regenerate the split: expected {expected}"),
    "features_missing": Problem(
        DataError, "feature file not found", "check the path"),
    "features_unreadable": Problem(
        DataError, "not a readable feature file ({reason})",
        "the file is truncated or its header is damaged: download or regenerate it"),
    "features_ndim": Problem(
        DataError, "features have shape {shape}, expected 3-D (images, regions, img_dim)",
        "use SCAN's precomputed BUTD features, shape (N, 36, 2048)"),
    "features_dtype": Problem(
        DataError, "features have dtype {dtype}, expected floating point",
        "regenerate the file as float32 region features"),
    "features_empty": Problem(
        DataError, "holds no images (shape {shape})",
        "download or regenerate the split"),
    "features_dim": Problem(
        DataError, "features are {dim}-dimensional but the model expects img_dim {img_dim}",
        "pass --img_dim {dim} to train on these features, or use the features of the "
        "checkpoint's dataset"),
    "features_regions": Problem(
        DataError, "{regions} regions per image, but the model expects {expected} ({why})",
        "use SCAN's {expected}-region BUTD features"),
    "features_nonfinite": Problem(
        DataError, "image {index} has NaN or Inf features ({checked})",
        "regenerate or re-download the file; `python checks.py --features FILE` checks "
        "every image"),
    "caption_count": Problem(
        DataError, "{n_caps} captions for the {n_images} images of {features}: expected "
        "5 per image ({n_five}) or 1 per image ({n_images}), otherwise every (image, caption) "
        "pair after the first missing or extra line is shifted",
        "restore the caption file so that lines 5i..5i+4 describe image i"),
    "caption_empty": Problem(
        DataError, "line {line} is empty ({count} empty line(s)); an empty line is a lost "
        "caption and shifts every later (image, caption) pair",
        "restore the missing caption(s) (lines 5i..5i+4 describe image i)"),
    "caption_utf8": Problem(
        Warn, "{count} line(s) are not valid UTF-8 (first: line {line}); the bad bytes were "
        "replaced and map to <unk>",
        "re-encode the file as UTF-8 if those words matter"),
    "oov": Problem(
        Info, "{rate:.2f}% of caption tokens are not in the vocabulary and map to <unk> "
        "({n_oov} of {n_tokens} tokens in {sample})",
        "a few percent is normal (words seen fewer than 4 times)"),
    "oov_high": Problem(
        Warn, "{rate:.1f}% of caption tokens are not in the vocabulary {vocab}",
        "the vocabulary is probably of another dataset: pass the --vocab_path/--data_name "
        "of this dataset, or build one with vocab.py"),
    # a matcher's optional input files beside the split (boxes, word ids, parses, ...)
    "input_count": Problem(
        DataError, "{found} for the {n} {items} of the split: every {item} after a missing or "
        "extra entry would get another's",
        "use the file of this split, or delete it ({without})"),
    "input_shape": Problem(
        DataError, "{what} of shape {shape}, expected {expected}",
        "use the file of this split, or delete it ({without})"),
    "input_invalid": Problem(
        DataError, "{what}", "{fix}"),
    "input_unpaired": Problem(
        DataError, "not found, but {other} is there ({why})",
        "add it, or delete {other} ({without})"),
    "input_required": Problem(
        DataError, "not found ({why})", "add it, or drop {flag}"),
    # --------------------------------------------------------------- vocabulary
    "vocab_missing": Problem(
        VocabError, "vocabulary file not found",
        "pass --vocab_path DIR holding {name}, or build it: python vocab.py --data_path DATA "
        "--data_name {data_name}"),
    "vocab_invalid": Problem(
        VocabError, "not a vocabulary json ({reason})",
        "rebuild it: python vocab.py --data_path DATA --data_name {data_name}"),
    "vocab_size": Problem(
        VocabError, "{n_vocab} words, but {checkpoint} was trained with {n_ckpt} "
        "(txt_enc.embed.weight): the vocabulary is of another dataset",
        "pass the --vocab_path and --data_name the checkpoint was trained with"),
    # --------------------------------------------------------------- pretrained BERT
    "bert_missing": Problem(
        UsageError, "no such directory", BERT_FIX),
    "bert_not_model_dir": Problem(
        UsageError, "no config.json in this directory, so it is not a Hugging Face model "
        "directory", BERT_FIX),
    "bert_config": Problem(
        UsageError, "config.json {reason}", BERT_FIX),
    "bert_no_vocab": Problem(
        UsageError, "no vocab.txt (or tokenizer.json), so the captions cannot be tokenised",
        BERT_FIX),
    "bert_offline": Problem(
        UsageError, "not a local directory, not in the Hugging Face cache, and the hub cannot "
        "be reached (offline)", BERT_FIX),
    "bert_unreadable": Problem(
        UsageError, "its {what} cannot be read ({reason})", BERT_FIX),
    "bert_weights": Problem(
        UsageError, "no pretrained weights in this directory ({files})",
        "add the weights of that BERT, or pass --bert_init random to train it from random "
        "weights"),
    "bert_vocab": Problem(
        UsageError, "the tokenizer's vocabulary {problem}",
        "use the vocabulary of a BERT ([PAD] id 0, [CLS], [SEP], [MASK]) whose size fits its "
        "config"),
    "bert_mismatch": Problem(
        UsageError, "this BERT ({ours}) is not the one {checkpoint} was trained with ({theirs})",
        "pass --bert_path DIR of the BERT it was trained with (its config.json and vocab.txt: "
        "the weights come from the checkpoint)"),
    # --------------------------------------------------------------- checkpoints
    "ckpt_missing": Problem(
        CheckpointError, "checkpoint not found",
        "check the path given to --resume or --model_path"),
    "ckpt_truncated": Problem(
        CheckpointError, "the checkpoint is truncated or damaged ({reason})",
        "copy or download it again"),
    "ckpt_not_torch": Problem(
        CheckpointError, "not a PyTorch checkpoint ({reason})",
        "pass a .pth.tar file written by train.py (or the authors' model_best.pth.tar)"),
    "ckpt_not_model": Problem(
        CheckpointError, "not a checkpoint of an image-text matcher ({reason})",
        "pass a checkpoint_N.pth.tar or model_best.pth.tar written by train.py or the "
        "authors"),
    "ckpt_refused": Problem(
        CheckpointError, "refused to load: it pickles {name}, which is neither a tensor, a "
        "plain container nor argparse.Namespace (nothing in it was run)",
        "use a checkpoint from a source you trust, or one that holds only weights"),
    "ckpt_py2": Problem(
        CheckpointError, "this looks like a checkpoint of the original python2.7 branch "
        "({reason})",
        "use the python3.6 branch's checkpoint, or convert it: python checks.py "
        "--convert-py2 {where} NEW.pth.tar"),
    "ckpt_mismatch": Problem(
        CheckpointError, "does not match the model built from the flags: {diff}",
        "pass {flags} (the flags it was trained with)"),
    "ckpt_foreign": Problem(
        CheckpointError, "its weights do not fit the {model} model the flags build: {diff}",
        "it is a checkpoint of another model or code version: use one written by train.py "
        "or the authors"),
    # --------------------------------------------------------------- flags and run directory
    "flag_positive": Problem(
        UsageError, "must be a positive integer", "pass a value of 1 or more"),
    "flag_nonnegative": Problem(
        UsageError, "must not be negative", "pass 0 or more"),
    "lr_update": Problem(
        UsageError, "must be a positive number of epochs (the learning rate is divided by 10 "
        "every lr_update epochs)",
        "pass e.g. --lr_update 30 (Flickr30K) or 10 (COCO); more than --num_epochs never "
        "decays it"),
    "learning_rate": Problem(
        UsageError, "must be positive", "pass e.g. --learning_rate 0.0002"),
    "margin": Problem(
        UsageError, "a negative margin rewards ranking a wrong caption above the right one",
        "pass a margin of 0 or more (the paper uses 0.2)"),
    "module_name": Problem(
        UsageError, "unknown matcher",
        "pass --module_name {choices}"),
    "flag_unsupported": Problem(
        UsageError, "does not apply to {model}: {why}",
        "drop it"),
    "torchrun_unsupported": Problem(
        UsageError, "{model} cannot train under torchrun: {why}",
        "train it in one process (python train.py --module_name {model} ...), as the "
        "original"),
    "batch_one": Problem(
        UsageError, "a batch of one pair has no negative, so the max-violation hinge loss is "
        "always 0 (and BatchNorm cannot train on one image)",
        "pass --batch_size 2 or more (the paper uses 128)"),
    "batch_remainder": Problem(
        UsageError, "the {n} captions of the train split leave a last batch of 1 in every "
        "epoch, which BatchNorm cannot train on",
        "pass a --batch_size that leaves another remainder, e.g. {suggest}"),
    "flag_divides": Problem(
        UsageError, "must divide {what} (the attention heads split the embedding)",
        "pass a number that divides it"),
    "flag_range": Problem(
        UsageError, "must be {range}", "pass a value in that range"),
    "batch_too_large": Problem(
        UsageError, "the train split has {n} captions, fewer than one batch (the last, "
        "incomplete batch of every epoch is dropped, so no step would be taken)",
        "pass a --batch_size of {n} or less"),
    "fold5": Problem(
        UsageError, "the {split} split has {n_images} images, but 5-fold 1K evaluation needs "
        "5000 (COCO testall)",
        "drop --fold5, or pass --split testall with COCO"),
    "run_exists": Problem(
        RunExistsError, "already holds {found} of another run",
        "pass --resume {latest} to continue it, --overwrite to replace it, or another "
        "--model_name"),
    "file_exists": Problem(
        UsageError, "already exists", "pass a new file name; nothing is written over a file"),
    "diverged": Problem(
        DivergedError, "{what} at iteration {iteration}; the run stopped and saved nothing, so "
        "the last good checkpoint is kept",
        "lower --learning_rate, or check the features (python checks.py --features FILE), "
        "then --resume from the last checkpoint_N.pth.tar"),
}


def message(key, where, **fields):
    """The one-line message of a problem."""
    p, fields = PROBLEMS[key], dict(fields, where=where)
    return "%s: %s; %s" % (where, p.problem.format(**fields), p.fix.format(**fields))


def error(key, where, **fields):
    """The exception of a problem, for the caller to raise (so the traceback points there)."""
    return PROBLEMS[key].cls(message(key, where, **fields), key=key)


def exit_on_error(main):
    """Wrap a CLI `main(argv)`: an SGRAFError prints `error: <message>` and exits with its
    code; every other exception stays a traceback (it is a bug, not a usage error)."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SGRAFError as e:
            print("error: %s" % e, file=sys.stderr)
            raise SystemExit(e.exit_code) from None
    return wrapper


def first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ----------------------------------------------------------------------------- flags

_POSITIVE = ("num_epochs", "batch_size", "log_step", "val_step", "img_dim", "word_dim",
             "embed_size", "num_layers")
_NONNEGATIVE = ("workers", "grad_clip")


def opt_where(opt, name):
    """How a flag is named in a message: `--name value`."""
    return "--%s %s" % (name, getattr(opt, name))


def check_positive(opt, names):
    for name in names:
        if getattr(opt, name, 1) < 1:
            raise error("flag_positive", opt_where(opt, name))


def check_nonnegative(opt, names):
    for name in names:
        if getattr(opt, name, 0) < 0:
            raise error("flag_nonnegative", opt_where(opt, name))


def check_train_opt(opt):
    """Flags of train.py that cannot work together, then the run directory. (The matcher's own
    flags are checked by its class's `check_opt`.)"""
    check_positive(opt, _POSITIVE)
    check_nonnegative(opt, _NONNEGATIVE)
    if opt.lr_update < 1:
        raise error("lr_update", opt_where(opt, "lr_update"))
    if not opt.learning_rate > 0:
        raise error("learning_rate", opt_where(opt, "learning_rate"))
    if opt.margin < 0:
        raise error("margin", opt_where(opt, "margin"))
    if opt.batch_size == 1:
        raise error("batch_one", opt_where(opt, "batch_size"))
    check_run_dir(opt.model_name, resume=opt.resume, overwrite=opt.overwrite)


def check_run_dir(model_name, resume="", overwrite=False):
    """Refuse a `--model_name` that holds another run's checkpoints, unless the run is
    resumed or `--overwrite` is given: its model_best.pth.tar would be replaced."""
    if resume or overwrite or not os.path.isdir(model_name):
        return
    names = os.listdir(model_name)
    ckpts = sorted((n for n in names if re.fullmatch(r"checkpoint_\d+\.pth\.tar", n)),
                   key=lambda n: int(re.findall(r"\d+", n)[0]))
    found = (["model_best.pth.tar"] if "model_best.pth.tar" in names else []) + ckpts[-1:]
    if found:
        latest = os.path.join(model_name, ckpts[-1] if ckpts else "model_best.pth.tar")
        raise error("run_exists", model_name, found=" and ".join(found), latest=latest)


def check_last_batch(n_captions, batch_size):
    """A shuffled epoch whose last batch holds one pair crashes in BatchNorm1d at the end of
    the first epoch; say so before training."""
    if batch_size > 1 and n_captions % batch_size == 1:
        suggest = next(b for b in (batch_size - 1, batch_size + 1, batch_size + 2)
                       if n_captions % b != 1)
        raise error("batch_remainder", "--batch_size %d" % batch_size, n=n_captions,
                    suggest=suggest)


def check_fold5(fold5, n_images, split):
    if fold5 and n_images != 5000:
        raise error("fold5", "--fold5", split=split, n_images=n_images)


# ----------------------------------------------------------------------------- data

def _expected(split):
    return "%s_ims.npy (or %s.h5) and %s_caps.txt" % (split, split, split)


def check_split_files(data_path, split, feat_path, cap_path):
    """The dataset directory and the two files of a split exist."""
    if not os.path.isdir(data_path):
        raise error("data_dir", data_path, expected=_expected(split))
    missing = [os.path.basename(p) for p in (feat_path, cap_path) if not os.path.isfile(p)]
    if missing:
        found = sorted(os.listdir(data_path))
        shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
        raise error("split_missing", data_path, missing=" and ".join(missing),
                    found=shown or "nothing", expected=_expected(split))


def sample_indices(n, k=N_SAMPLE_IMAGES):
    """k image indices evenly spaced over n, first and last included."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))})


def check_features_finite(images, path, sample=N_SAMPLE_IMAGES, chunk=256):
    """No NaN/Inf in `images` (N, R, img_dim): a sample of images, or all (`sample=None`)."""
    n = len(images)
    if sample is not None:
        indices = sample_indices(n, sample)
        for i in indices:
            if not np.isfinite(np.asarray(images[i], dtype=np.float32)).all():
                raise error("features_nonfinite", path, index=i,
                            checked="found in a sample of %d images" % len(indices))
        return
    for start in range(0, n, chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float32)
        bad = ~np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if bad.any():
            raise error("features_nonfinite", path, index=start + int(np.argmax(bad)),
                        checked="all %d images checked" % n)


def check_features(images, path, img_dim=None, sample=N_SAMPLE_IMAGES, regions=None):
    """Shape and dtype from the header (no data read), then NaN/Inf on `sample` images (all
    with None). `regions`: (count, why) when the model needs that many regions per image."""
    shape = tuple(images.shape)
    if len(shape) != 3:
        raise error("features_ndim", path, shape=shape)
    if not np.issubdtype(images.dtype, np.floating):
        raise error("features_dtype", path, dtype=images.dtype)
    if shape[0] == 0:
        raise error("features_empty", path, shape=shape)
    if img_dim is not None and shape[2] != img_dim:
        raise error("features_dim", path, dim=shape[2], img_dim=img_dim)
    if regions is not None and shape[1] != regions[0]:
        raise error("features_regions", path, regions=shape[1], expected=regions[0],
                    why=regions[1])
    check_features_finite(images, path, sample)


def check_captions(captions, n_images, cap_path, feat_path):
    """5 or 1 captions per image, and no empty line."""
    empty = [i + 1 for i, c in enumerate(captions) if not c]
    if empty:
        raise error("caption_empty", cap_path, line=empty[0], count=len(empty))
    if len(captions) not in (5 * n_images, n_images):
        raise error("caption_count", cap_path, n_caps=len(captions), n_images=n_images,
                    n_five=5 * n_images, features=os.path.basename(feat_path))


def report_oov(captions, vocab, cap_path, max_captions=N_SAMPLE_CAPTIONS):
    """Log the share of caption tokens that map to <unk>, on an evenly spaced sample."""
    step = max(1, -(-len(captions) // max_captions))
    sample = captions[::step]
    n_tokens = n_oov = 0
    for caption in sample:
        ids, oov = encode_caption_with_oov(vocab, caption)
        n_tokens += len(ids) - 2
        n_oov += oov
    rate = 100.0 * n_oov / max(n_tokens, 1)
    what = ("all %d captions" % len(sample) if step == 1 else
            "a sample of %d of %d captions" % (len(sample), len(captions)))
    log.info(message("oov", cap_path, rate=rate, n_oov=n_oov, n_tokens=n_tokens,
                     sample=what))
    if rate > 100 * OOV_WARN:
        log.warning(message("oov_high", cap_path, rate=rate, vocab="(%d words)" % len(vocab)))
    return rate


def check_split(images, captions, feat_path, cap_path, img_dim=None, vocab=None, regions=None):
    """Everything about a loaded split that is cheap to check; reports the OOV rate."""
    check_features(images, feat_path, img_dim, regions=regions)
    check_captions(captions, len(images), cap_path, feat_path)
    if vocab is not None:
        report_oov(captions, vocab, cap_path)


# ----------------------------------------------------------------------------- vocabulary

def load_vocab(path, loader=deserialize_vocab):
    """`vocab.deserialize_vocab(path)` (or `loader(path)`, a matcher's reader of
    another vocabulary format), with a VocabError for a missing or malformed file."""
    data_name = re.sub(r"(_vocab)?\.json$", "", os.path.basename(path))
    if not os.path.isfile(path):
        raise error("vocab_missing", path, name=os.path.basename(path), data_name=data_name)
    try:
        vocab = loader(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        reason = ("no %s entry" % e) if isinstance(e, KeyError) else first_line(e)
        raise error("vocab_invalid", path, reason=reason, data_name=data_name) from None
    missing = [t for t in SPECIAL_TOKENS if t not in vocab.word2idx]
    if missing:
        raise error("vocab_invalid", path, reason="no %s token" % missing[0],
                    data_name=data_name)
    return vocab


# ----------------------------------------------------------------------------- files

# what a checkpoint may pickle besides tensors and plain containers
SAFE_GLOBALS = [argparse.Namespace]


def atomic_save(obj, path):
    """torch.save to a temporary file in the target's directory, fsynced, then renamed over the
    target: a crash never leaves a half-written file behind."""
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth.tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class H5Features:
    """Array-like view of `feat` in an HDF5 file (np2h.py), opened lazily in each process that
    reads it (an h5py handle must not cross a fork into DataLoader workers)."""

    def __init__(self, path):
        import h5py
        self.path = path
        with h5py.File(path, "r") as f:
            ds = f["feat"]
            self.shape, self.dtype = tuple(ds.shape), ds.dtype
        self._file = None
        self._pid = None

    def __len__(self):
        return self.shape[0]

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        import h5py
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["feat"][idx]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state


def open_features(path):
    """A read-only array of shape (N, R, img_dim) that does not load the file into RAM
    (a memory-mapped `.npy`, or an `.h5`), or a DataError for a file that cannot be read."""
    try:
        if path.endswith(".h5"):
            return H5Features(path)
        return np.load(path, mmap_mode="r")
    except Exception as e:  # a damaged header or a short file: whatever numpy or h5py raise
        raise error("features_unreadable", path, reason=first_line(e)) from None


# ----------------------------------------------------------------------------- checkpoints

# the pickled magic number that starts a torch file in the legacy (pre-zip) format
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_PY2_MODULES = ("__builtin__", "copy_reg", "exceptions")


def _python2_strings(path):
    """Whether a legacy-format torch file holds Python 2 byte strings (`str` of Python 2 is
    pickled as (SHORT_)BINSTRING, which Python 3 never writes)."""
    with open(path, "rb") as f:
        if f.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC:
            return False
        f.seek(0)
        try:
            for _ in range(4):  # magic number, protocol version, system info, the object
                for op, _, _ in pickletools.genops(f):
                    if op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                        return True
        except Exception:  # a damaged pickle: the caller reports the load error
            return False
    return False


def _load_reason(exc):
    """The informative line of a torch.load error (weights-only errors start with advice)."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(\S.*)", text) or \
        re.search(r"(Unsupported operand \d+)", text)
    return m.group(1).strip() if m else first_line(exc)


def explain_load_failure(path, exc):
    """The CheckpointError for a file that `torch.load(weights_only=True)` could not load."""
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    name = refused.group(1).rstrip(".") if refused else None
    if _python2_strings(path) or (name and name.split(".")[0] in _PY2_MODULES):
        reason = ("Python 2 strings in its pickle: %s" % _load_reason(exc) if not name else
                  "it pickles the Python 2 global %s" % name)
        return error("ckpt_py2", path, reason=reason)
    if name:
        return error("ckpt_refused", path, name=name)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    size = os.path.getsize(path)
    if size == 0:
        return error("ckpt_truncated", path, reason="empty file")
    if (head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path)) or \
            head == _LEGACY_MAGIC:
        return error("ckpt_truncated", path, reason="%d bytes; %s" % (size, _load_reason(exc)))
    return error("ckpt_not_torch", path, reason=_load_reason(exc))


def check_checkpoint_structure(ckpt, path):
    """The originals' format, common to every matcher: a dict with 'model' = a list of state
    dicts (e.g. [img_enc, txt_enc, sim_enc]) and 'opt' = an argparse.Namespace. Which matcher
    it is, is for the registry to say (matchers.recognise)."""
    if not isinstance(ckpt, dict):
        raise error("ckpt_not_model", path, reason="it holds a %s" % type(ckpt).__name__)
    if "model" not in ckpt or "opt" not in ckpt:
        keys = ", ".join(sorted(map(str, ckpt))[:5]) or "none"
        raise error("ckpt_not_model", path, reason="no 'model'/'opt' entries; its keys: %s"
                    % keys)
    model = ckpt["model"]
    if not (isinstance(model, (list, tuple)) and len(model) >= 1 and
            all(isinstance(sd, dict) for sd in model)):
        raise error("ckpt_not_model", path,
                    reason="'model' is not a list of state dicts ([img_enc, txt_enc, ...])")
    if not isinstance(ckpt["opt"], argparse.Namespace):
        raise error("ckpt_not_model", path, reason="'opt' is a %s, not the options"
                    % type(ckpt["opt"]).__name__)
    if any(isinstance(v, bytes) for v in vars(ckpt["opt"]).values()):
        raise error("ckpt_py2", path, reason="its options hold byte strings")


def state_shape(sd, key, axis):
    """Size `axis` of state dict entry `key`, or None (for the matchers' `infer_flags`)."""
    return tuple(sd[key].shape)[axis] if key in sd and sd[key].dim() > axis else None


def flag_text(name, value):
    """A flag as the user would write it: `--name value`, `--name`, `--no-name`."""
    if isinstance(value, bool):
        return ("--%s" if value else "--no-%s") % name
    return "--%s %s" % (name, value)


def _some(keys, n=2):
    return ", ".join(keys[:n]) + (" and %d more" % (len(keys) - n) if len(keys) > n else "")


def check_checkpoint_matches(model, ckpt, path, vocab_file="the vocabulary", want=None):
    """The checkpoint's state dicts have the keys and shapes of `model` (built from the
    flags); otherwise name the flags and keys that differ. Run before load_state_dict.
    `want`: the flags the checkpoint was built with, from its own matcher class's
    `infer_flags` (with its module_name) when the caller recognised it; default: read by the
    model's class."""
    names = model.state_names
    ours, theirs = model.state_dict(), ckpt["model"]
    missing, unexpected, shapes = [], [], []
    # e.g. three state dicts against two, or a checkpoint that lost one: said neutrally
    # (infer_flags names the model where the keys say which)
    count = (None if len(ours) == len(theirs) else
             "%d state dicts in the checkpoint, %d (%s) from the flags"
             % (len(theirs), len(ours), ", ".join(names)))
    optional = set(getattr(model, "optional_keys", ()))  # a checkpoint may have them or not
    for name, a, b in zip(names, ours, theirs):
        missing += ["%s.%s" % (name, k) for k in a if k not in b
                    and "%s.%s" % (name, k) not in optional]
        unexpected += ["%s.%s" % (name, k) for k in b if k not in a
                       and "%s.%s" % (name, k) not in optional]
        shapes += ["%s.%s %s vs %s" % (name, k, tuple(b[k].shape), tuple(a[k].shape))
                   for k in a if k in b and tuple(a[k].shape) != tuple(b[k].shape)]
    if want is None:
        want = type(model).infer_flags(theirs, ckpt.get("opt"))
    have = dict(type(model).infer_flags(ours, model.opt), module_name=model.opt.module_name)
    if not (count or missing or unexpected or shapes):
        # the same weights; flags they cannot show (infer_flags reads them from the options,
        # e.g. a variant that changes the computation but no parameter) must agree too
        differ = [k for k in want if want[k] is not None and have.get(k) is not None and
                  want[k] != have[k]]
        if differ:
            diff = "; ".join("%s in the checkpoint, %s from the flags"
                             % (flag_text(k, want[k]), flag_text(k, have[k])) for k in differ)
            raise error("ckpt_mismatch", path, diff=diff,
                        flags=" ".join(flag_text(k, want[k]) for k in differ))
        return
    differ = [k for k in want if want[k] is not None and want[k] != have.get(k)]
    if differ == ["vocab_size"] and not (count or missing or unexpected):
        raise error("vocab_size", vocab_file, n_vocab=have["vocab_size"], checkpoint=path,
                    n_ckpt=want["vocab_size"])
    parts = ["%s in the checkpoint, %s from the flags"
             % (flag_text(k, want[k]), flag_text(k, have[k]))
             for k in differ if k != "vocab_size" and have.get(k) is not None]
    if "vocab_size" in differ:
        parts.append("a vocabulary of %d words, %s has %s" % (want["vocab_size"], vocab_file,
                                                              have.get("vocab_size")))
    if count:
        parts.append(count)
    if missing:
        parts.append("missing keys %s" % _some(missing))
    if unexpected:
        parts.append("unexpected keys %s" % _some(unexpected))
    if shapes:
        parts.append("shapes (checkpoint vs flags) %s" % _some(shapes))
    flags = [flag_text(k, want[k]) for k in differ if k != "vocab_size"]
    if flags and "vocab_size" in differ:
        flags.append("and its vocabulary")
    if not flags:
        raise error("ckpt_foreign", path, diff="; ".join(parts), model=model.opt.module_name)
    raise error("ckpt_mismatch", path, diff="; ".join(parts), flags=" ".join(flags))


def convert_py2_checkpoint(src, dst):
    """Re-save a checkpoint of the original python2.7 branch for Python 3, still loading it
    with weights_only (nothing in it is run). Its byte strings are read as UTF-8 where they
    are, else as Latin-1. Never writes over an existing file."""
    if os.path.exists(dst):
        raise error("file_exists", dst)
    try:
        # torch warns that `encoding` needs weights_only=False, but its weights-only unpickler
        # does decode Python 2 strings with it (tests/test_bad_input.py checks this)
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "pickle_load_args")
            ckpt = torch.load(src, map_location="cpu", weights_only=True, encoding="latin1")
    except Exception as e:
        raise explain_load_failure(src, e) from None

    def fix(s):
        try:
            return s.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return s
    if isinstance(ckpt, dict) and isinstance(ckpt.get("opt"), argparse.Namespace):
        ckpt["opt"] = argparse.Namespace(**{k: fix(v) if isinstance(v, str) else v
                                            for k, v in vars(ckpt["opt"]).items()})
    check_checkpoint_structure(ckpt, src)
    atomic_save(ckpt, dst)


# ----------------------------------------------------------------------------- training

def stop_on_nonfinite(model):
    """Check the gradients before every optimizer step: a NaN/Inf loss or gradient raises
    DivergedError before the step, so the parameters stay those of the last good step and
    nothing is saved. One pass over the gradients per step."""
    def hook(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        loss = model.logger.meters["Loss"].val if "Loss" in model.logger.meters else None
        loss_bad = loss is not None and not math.isfinite(loss)
        if loss_bad or (grads and not bool(torch.stack([g.isfinite().all()
                                                        for g in grads]).all())):
            what = ("loss is %s" % loss if loss_bad else
                    "gradients are not finite (loss %s)" % loss)
            raise error("diverged", model.opt.model_name, what=what, iteration=model.Eiters)
    return model.optimizer.register_step_pre_hook(hook)


def check_loss(loss, iteration, where):
    """A non-finite loss returned by a train step (for a step that was not stopped before)."""
    value = float(loss)
    if not math.isfinite(value):
        raise error("diverged", where, what="loss is %s" % value, iteration=iteration)


# ----------------------------------------------------------------------------- the table

def _template(text):
    """Markdown of a message template: literal <, > and | escaped, fields as `<field>`."""
    text = text.replace("<", "\\<").replace(">", "\\>").replace("|", "\\|")
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"`<\1>`", text)


def render_table():
    """TROUBLESHOOTING.md: every message of PROBLEMS, as a markdown table."""
    lines = [
        "# Troubleshooting",
        "",
        "Generated by `python checks.py --table > TROUBLESHOOTING.md` from the messages in",
        "`checks.py` (a test fails when this file is out of date). Every problem is one line,",
        "`<file or flag>: <problem>; <fix>`, printed as `error: ...` by train.py and",
        "evaluation.py before any compute, with the exit code below; no existing file is",
        "written. Warnings and reports are logged and the run goes on.",
        "",
        "| Kind | Key | Problem | What to do | Exit |",
        "|---|---|---|---|---|",
    ]
    for key, p in PROBLEMS.items():
        code = p.cls.exit_code if p.cls.exit_code is not None else "-"
        kind = {"Warn": "warning", "Info": "report"}.get(p.cls.__name__, p.cls.__name__)
        lines.append("| %s | `%s` | %s | %s | %s |" % (kind, key, _template(p.problem),
                                                       _template(p.fix), code))
    lines += [
        "",
        "Caption bytes that are not UTF-8 are replaced (U+FFFD, mapped to `<unk>`) with a",
        "warning rather than refused: a bad byte costs one word, and its line still holds its",
        "caption, so no pair shifts. Empty caption lines are refused: each one is a lost",
        "caption, and every later (image, caption) pair shifts.",
        "",
    ]
    return "\n".join(lines)


@exit_on_error
def main(argv=None):
    p = argparse.ArgumentParser(description="SGRAF input checks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--table", action="store_true", help="print TROUBLESHOOTING.md")
    g.add_argument("--features", nargs="+", metavar="FILE",
                   help="check every image of feature files (.npy or .h5) for NaN/Inf")
    g.add_argument("--convert-py2", nargs=2, metavar=("OLD", "NEW"),
                   help="re-save a checkpoint of the original python2.7 branch")
    p.add_argument("--img_dim", type=int, default=None, help="expected feature dimension")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if args.table:
        sys.stdout.write(render_table())
    elif args.features:
        for path in args.features:
            if not os.path.isfile(path):
                raise error("features_missing", path)
            images = open_features(path)
            check_features(images, path, args.img_dim, sample=None)
            print("%s: %s images of shape %s, all finite" % (path, len(images),
                                                             tuple(images.shape[1:])))
    else:
        convert_py2_checkpoint(*args.convert_py2)
        print("wrote %s" % args.convert_py2[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
