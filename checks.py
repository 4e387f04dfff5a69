"""Validation of what a run is given: data, vocabulary, checkpoints, flags, devices, paths, and
where it writes.

Every mistake is reported as one line, `<file or flag>: <problem>; <fix>`, by an `SGRAFError`
raised before hours of compute are spent, and without writing to any file the user already
has. Every command's main is wrapped in `exit_on_error`: it prints `error: <message>` to
stderr and exits with the error's code (2 for usage, data, vocabulary, checkpoint and
run-directory errors, as argparse does; 1 for a run that diverged); their parsers are
`ArgumentParser`, whose own errors (unknown flags and choices, bad values) are such lines too.
Library functions raise and never exit.

One rule for every file a command writes (section "what a command writes"): never over a file
or a run that the command did not make unless the user asked (`--overwrite`), the shipped
vocabularies never by default (`check_output_file`, `check_run`); what the project made is
recorded in a marker in its directory (`mark_made`, `made_record`); files are written through
a partial file renamed at the end, and a killed run's partial files are removed by the next
write there (`atomic_output`).

This is the bottom of the project's imports (it imports only `vocab`): the data, checkpoint and
matcher files call it, and it knows no matcher; what is specific to one (its flags, its checkpoint
layout, the number of regions it needs) reaches it as arguments.

All messages are defined in `PROBLEMS` below; `TROUBLESHOOTING.md` is generated from them:
    python checks.py --table > TROUBLESHOOTING.md
Two more commands:
    python checks.py --features data/f30k_precomp/train_ims.npy   # every image finite, shape
    python checks.py --convert-py2 OLD.pth.tar NEW.pth.tar         # python2.7-branch checkpoint
and vocab.py's (`vocab_command`: vocab.py cannot import this module, which imports it).

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
import fcntl
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import pickletools
import re
import socket
import sys
import warnings
import zipfile
from collections import namedtuple

import numpy as np
import torch

from vocab import (DEFAULT_CAPTION_FILES, PARTIAL, SPECIAL_TOKENS, build_vocab,
                   deserialize_vocab, encode_caption_with_oov, partial_path, serialize_vocab)

log = logging.getLogger(__name__)

# images whose features are checked for NaN/Inf at start-up, evenly spaced over the file
N_SAMPLE_IMAGES = 8
# captions tokenised for the out-of-vocabulary report when a split is loaded
N_SAMPLE_CAPTIONS = 5000
# above this share of <unk> tokens the vocabulary is probably of another dataset
OOV_WARN = 0.10


# ----------------------------------------------------------------------------- errors

class SGRAFError(Exception):
    """A mistake in what the run was given; the message is one line: `where: problem; fix`.
    `shared`: every process of a torchrun launch raised it, and rank 0 alone prints it."""
    exit_code = 2
    shared = False

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
BERT_FIX = ("pass --bert_path DIR holding a BERT's config.json and vocab.txt (and its "
            "weights, to train from them)")

# key -> (class, problem, fix). The message is "{where}: {problem}; {fix}" with the fields
# formatted in; TROUBLESHOOTING.md shows the templates.
PROBLEMS = {
    # --------------------------------------------------------------- data
    "data_dir": Problem(
        DataError, "dataset directory not found",
        "pass --data_path DIR and --data_name NAME so that DIR/NAME/ holds {expected}"),
    "data_dir_nested": Problem(
        DataError, "dataset directory not found, but {parent} holds the {split} split itself",
        "--data_path is the directory above the dataset's: pass --data_path {above} "
        "--data_name {name}"),
    "split_missing": Problem(
        DataError, "{missing} not found (the directory holds: {found})",
        "download or regenerate the split ({expected})"),
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
    "features_zero_region": Problem(
        Warn, "image {index} has an all-zero region (region {region}; {checked})",
        "training from scratch stops at its first batch (l2norm has no gradient at 0): "
        "regenerate the features or drop such images"),
    "features_nonfinite": Problem(
        DataError, "image {index} has NaN or Inf features ({checked})",
        "regenerate or re-download the file; `python checks.py --features FILE` checks "
        "every image"),
    "caption_count": Problem(
        DataError, "{n_caps} captions for the {n_images} images of {features}, not 5 per "
        "image ({n_five}) or 1 ({n_images}): every pair after a missing or extra line is "
        "shifted",
        "restore the file (lines 5i..5i+4 describe image i)"),
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
        DataError, "{found} for the {n} {items} of the split: every later {item} would be "
        "misaligned",
        "use this split's file, or delete it ({without})"),
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
        "(txt_enc.embed.weight): a vocabulary of another dataset",
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
        UsageError, "this BERT ({ours}) is not {checkpoint}'s ({theirs})",
        "pass --bert_path DIR of the BERT it was trained with (its config.json and vocab.txt)"),
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
        "--convert-py2 {name} NEW.pth.tar"),
    "ckpt_mismatch": Problem(
        CheckpointError, "does not match the model built from the flags: {diff}",
        "pass {flags} (the flags it was trained with)"),
    "ckpt_foreign": Problem(
        CheckpointError, "its weights do not fit the {model} model the flags build: {diff}",
        "it is of another model or code version: use one written by train.py or the "
        "authors"),
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
        UsageError, "the {split} split has {n_images} images and {n_caps} captions, but 5-fold "
        "1K evaluation needs {needed} images with 5 captions each (COCO testall)",
        "drop --fold5, or pass --split testall with COCO"),
    "eval_captions": Problem(
        DataError, "{n_caps} captions for {n_images} images: R@K needs 5 captions per image "
        "(lines 5i..5i+4 describe image i)",
        "evaluate and validate on a split with 5 captions per image"),
    "resume_done": Problem(
        UsageError, "the resumed checkpoint {path} has already trained {epochs} epoch(s)",
        "pass a --num_epochs above {epochs} to train further"),
    "world_size": Problem(
        UsageError, "torchrun started {n} processes (WORLD_SIZE={n})",
        "pass --world_size {n} or drop it, or launch nnodes x nproc_per_node = {want} "
        "processes"),
    "world_size_plain": Problem(
        UsageError, "train.py is a single process and does not start others",
        "launch it with torchrun --standalone --nproc_per_node={want} train.py ... (one node, "
        "see README), or drop --world_size"),
    # --------------------------------------------------------------- command lines
    "arguments": Problem(
        UsageError, "{reason}", "see python {where} --help"),
    "flag_min": Problem(
        UsageError, "must be at least {minimum} ({why})", "pass {minimum} or more"),
    "flag_order": Problem(
        UsageError, "is above {other}", "pass at most {limit}"),
    "flag_choice": Problem(
        UsageError, "unknown {unknown}", "choose from {choices}"),
    "split_name": Problem(
        UsageError, "is not a split name (the SPLIT of SPLIT_ims.npy in --data_path)",
        "pass the names separated by spaces, e.g. --splits {suggest}"),
    "device": Problem(
        UsageError, "not a device ({reason})", "pass --device cpu, cuda or cuda:N"),
    "device_unavailable": Problem(
        UsageError, "{reason}", "pass --device {available}"),
    "data_name": Problem(
        UsageError, "is a path, not a dataset name (the name of a directory under --data_path, "
        "and of its vocabulary <data_name>_vocab.json)",
        "pass --data_path {head} --data_name {tail}"),
    "path_not_dir": Problem(
        UsageError, "{found} is a file, not a directory", "pass {expected}"),
    "path_not_file": Problem(
        UsageError, "is a directory, not a file", "pass {expected}"),
    "dir_missing": Problem(
        UsageError, "directory not found", "pass {expected}"),
    # --------------------------------------------------------------- what a command writes
    "file_exists": Problem(
        UsageError, "already exists{detail}",
        "pass --overwrite to replace it, or {alternative}"),
    "file_shipped": Problem(
        UsageError, "is the original {what} shipped with this repository (the authors' "
        "checkpoints need it)",
        "pass {alternative} (only --overwrite replaces a shipped file)"),
    "run_exists": Problem(
        RunExistsError, "already holds {found} of another run",
        "pass --resume with its {latest} to continue it, --overwrite to replace it, or "
        "another --model_name"),
    "output_dir": Problem(
        UsageError, "directory not found", "create it, or pass another {flag} path"),
    "output_not_ours": Problem(
        UsageError, "exists and was not written by this tool ({why})",
        "pass another {flag} file, or add --overwrite to replace it"),
    "output_other_run": Problem(
        UsageError, "holds the output of another run ({change})",
        "rerun that command to finish it, pass another {flag} file, or add --overwrite to "
        "start afresh"),
    "output_busy": Problem(
        UsageError, "is being written by another running process (its record is locked)",
        "wait for that process to finish, or pass another {flag} file"),
    "run_later": Problem(
        RunExistsError, "holds {found}, of epochs after the resumed {resumed}, which the run "
        "would write over",
        "pass --resume {latest} to continue the latest, --overwrite to replace them, or "
        "another --model_name"),
    "log_exists": Problem(
        RunExistsError, "already holds the TensorBoard logs of {owner}; a new run there would "
        "mix its curves with those",
        "pass another --logger_name (one per run), or --overwrite to replace them"),
    "run_dir": Problem(
        RunExistsError, "holds {found} of {whose}",
        "pass another --run_dir, or --overwrite to replace it"),
    "synthetic_mismatch": Problem(
        UsageError, "holds synthetic data made with other arguments ({diff})",
        "pass the same arguments, --overwrite to remake it, or another --data_path or "
        "--data_name"),
    "dataset_foreign": Problem(
        UsageError, "holds {found}, which synthetic.py did not make (no synthetic.json)",
        "pass another --data_path or --data_name (--overwrite would replace those files)"),
    # --------------------------------------------------------------- a diverged run
    "diverged": Problem(
        DivergedError, "{what} at iteration {iteration}; the run stopped before the optimizer "
        "step and saved nothing, so {last} is kept",
        "lower --learning_rate and pass --resume {last}"),
    "diverged_start": Problem(
        DivergedError, "{what} at iteration {iteration}, before the run's first checkpoint; "
        "it stopped and saved nothing",
        "lower --learning_rate and start again"),
    "diverged_nonfinite": Problem(
        DivergedError, "image {image} has NaN or Inf features, so at iteration {iteration} "
        "the {what}; nothing was saved",
        "regenerate or re-download the file (`python checks.py --features FILE` checks every "
        "image)"),
    "diverged_zero_region": Problem(
        DivergedError, "image {image} has an all-zero region (region {region}), so at "
        "iteration {iteration} the {what}; nothing was saved",
        "regenerate the features or drop such images (l2norm has no gradient at 0)"),
    # --------------------------------------------------------------- search and pictures
    "file_not_made": Problem(
        UsageError, "already exists and was not written by {tool}",
        "pass another {flag}, or move the file away: nothing is written over a file this "
        "command did not make"),
    "output_unwritable": Problem(
        UsageError, "cannot be written: {reason}",
        "pass a path in a directory you can write to"),
    "query_empty": Problem(
        UsageError, "the query is empty", 'pass a sentence, e.g. --query "a man rides a bike"'),
    "image_index": Problem(
        UsageError, "the {split} split has {n_images} images (indices 0 to {last})",
        "pass an index in that range"),
    "explain_unsupported": Problem(
        UsageError, "{model} has no word x region attention to show: {why}",
        "drop --explain (the search itself works)"),
    "cache_inside": Problem(
        UsageError, "is inside the {what} {inside}; the retrieval cache must not mix with data "
        "or checkpoints",
        "pass a --cache_dir outside it (the default is {default})"),
    "cache_unwritable": Problem(
        UsageError, "the retrieval cache cannot be kept there ({reason})",
        "pass a --cache_dir you can write to, or --no_cache"),
    "images_dir": Problem(
        DataError, "image directory not found",
        "pass --images DIR holding the split's image files"),
    "image_ids_missing": Problem(
        DataError, "image id file not found",
        "pass --image_ids FILE: one line per image of the split, its file name under --images"),
    "image_ids_count": Problem(
        DataError, "{n_lines} lines for the {n_images} images of the split",
        "pass an id file with one line per image (or one per caption) of this split"),
    "image_file": Problem(
        DataError, "no image file for id {image_id} (line {line}) under {images}: tried {tried}",
        "pass --image_ids FILE listing each image's file name under --images"),
    "boxes_missing": Problem(
        DataError, "region boxes not found: they are needed to draw regions on the images",
        "add {name} ((images, regions, 4) x1 y1 x2 y2 in pixels) to the split, or drop "
        "--images"),
    "boxes_shape": Problem(
        DataError, "boxes have shape {shape}, expected ({n_images}, {regions}, 4)",
        "use the boxes of this split's region features (x1 y1 x2 y2 in pixels)"),
    # --------------------------------------------------------------- download.py
    "item_unknown": Problem(
        UsageError, "no such item{close}", "pass a name that python download.py --list shows"),
    "from_file_names": Problem(
        UsageError, "installs one item, and {count} are named", "name the one item it holds"),
    "from_file_missing": Problem(
        UsageError, "file not found", "pass the path of the file you downloaded"),
    "gdown_missing": Problem(
        UsageError, "Google Drive files are fetched with gdown, which is not installed",
        "pip install gdown, or fetch it yourself and pass --from_file {file}"),
    "download_unreachable": Problem(
        DataError, "{url} is not reachable ({reason})",
        "download it yourself{alt} and pass --from_file {file}"),
    "download_interrupted": Problem(
        DataError, "the connection to {url} broke after {have} of {total} ({reason})",
        "run the same command again: it continues from {part}"),
    "download_busy": Problem(
        UsageError, "another download.py is writing this partial file",
        "wait for it to finish (or stop it), then run again"),
    "download_size": Problem(
        DataError, "{what} is {got} bytes where {source} states {expected}", "{fix}"),
    "download_sha256": Problem(
        DataError, "{what} has sha256 {got}..., not the table's {expected}...", "{fix}"),
    "disk_space": Problem(
        UsageError, "{need} are needed ({what}) and {free} are free",
        "free some space, or pass a {flag} on another disk"),
    "disk_full": Problem(
        DataError, "the disk filled up while writing {what} ({reason}); nothing was replaced",
        "free some space and run the same command again{resume}"),
    "archive_invalid": Problem(
        DataError, "{what} is not a valid archive ({reason})", "{fix}"),
    "archive_layout": Problem(
        DataError, "{what} holds no {expected}", "{fix}"),
    "ckpt_download_invalid": Problem(
        CheckpointError, "{what} is not a usable checkpoint ({reason})", "{fix}"),
    "ckpt_download_other": Problem(
        CheckpointError, "holds no {expected} checkpoint (found: {found})",
        "check the name in python download.py --list; {fix}"),
    "data_check": Problem(
        DataError, "{count} problem(s), each named in a line above",
        "fix them and run python download.py --check again"),
}


# an error line (`error: ` and the message) longer than this is hard to read at a glance
MAX_LINE = 300


def message(key, where, **fields):
    """The one-line message of a problem. A line that would pass MAX_LINE (say a long list of
    differing keys) has its longest descriptive field cut, never the `where` nor a field the
    fix needs."""
    p, fields = PROBLEMS[key], dict(fields, where=where)

    def render():
        return "%s: %s; %s" % (where, p.problem.format(**fields), p.fix.format(**fields))
    text = render()
    in_fix = set(re.findall(r"\{(\w+)", p.fix)) | {"where"}
    cuttable = [k for k, v in fields.items() if isinstance(v, str) and k not in in_fix]
    while len(text) + len("error: ") > MAX_LINE:  # the longest field first, then the next
        longest = [k for k in cuttable if len(fields[k]) > 23]
        if not longest:
            break
        k = max(longest, key=lambda k: len(fields[k]))
        over = len(text) + len("error: ") - MAX_LINE
        fields[k] = fields[k][:max(20, len(fields[k]) - over - 3)].rstrip() + "..."
        cuttable.remove(k)
        text = render()
    return text


def error(key, where, **fields):
    """The exception of a problem, for the caller to raise (so the traceback points there);
    `where` and `fields` stay on it (e.g. for a caller to say more)."""
    exc = PROBLEMS[key].cls(message(key, where, **fields), key=key)
    exc.where, exc.fields = where, fields
    return exc


def exit_on_error(main):
    """Wrap a CLI `main(argv)`: an SGRAFError prints `error: <message>` and exits with its
    code; every other exception stays a traceback (it is a bug, not a usage error)."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SGRAFError as e:
            if not (e.shared and os.environ.get("RANK", "0") != "0"):
                print("error: %s" % e, file=sys.stderr)
            raise SystemExit(e.exit_code) from None
    return wrapper


# a library's reason, quoted inside one of our lines, is cut to this length
REASON_CHARS = 120


def first_line(exc):
    """The first sentence of an exception's message (a library's reason, quoted in our
    one-line errors): libraries append paragraphs of advice that would bury the line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    m = re.match(r"(.+?[.!?])(\s|$)", lines[0])
    text = (m.group(1) if m else lines[0]).rstrip(".")
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3].rstrip() + "..."


# ----------------------------------------------------------------------------- command lines

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose own mistakes (an unknown flag, a value of the wrong type, an
    unknown choice, a missing argument) are one-line UsageErrors like every other,
    `error: train.py: unrecognized arguments: --x; see python train.py --help` with exit code 2
    (through `exit_on_error`), instead of argparse's usage block."""

    def error(self, message):
        raise error("arguments", self.prog, reason=message)


def opt_where(opt, name):
    """How a flag is named in a message: `--name value`."""
    return "--%s %s" % (name, getattr(opt, name))


def check_positive(opt, names):
    """Each flag (unset: None, or absent) is 1 or more."""
    for name in names:
        if getattr(opt, name, None) is not None and getattr(opt, name) < 1:
            raise error("flag_positive", opt_where(opt, name))


def check_nonnegative(opt, names):
    """Each flag (unset: None, or absent) is 0 or more."""
    for name in names:
        if getattr(opt, name, None) is not None and getattr(opt, name) < 0:
            raise error("flag_nonnegative", opt_where(opt, name))


def check_min(opt, name, minimum, why):
    if getattr(opt, name) < minimum:
        raise error("flag_min", opt_where(opt, name), minimum=minimum, why=why)


def check_choices(opt, name, choices, sep=","):
    """A `sep`-separated list flag (e.g. bench.py's `--what eval,train`) names only known choices."""
    unknown = [v for v in str(getattr(opt, name)).split(sep) if v not in choices]
    if unknown:
        raise error("flag_choice", opt_where(opt, name), unknown=sep.join(unknown),
                    choices=sep.join(choices))


def check_device(device, where="--device"):
    """A device that torch knows and this machine has (None: the command's default)."""
    if device is None:
        return
    flag = "%s %s" % (where, device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise error("device", flag, reason=first_line(e)) from None
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ", ".join(["cpu"] + (["cuda"] if n_cuda else []) +
                          ["cuda:%d" % i for i in range(n_cuda)])
    if dev.type == "cuda":
        if n_cuda == 0:
            raise error("device_unavailable", flag, available=available,
                        reason="CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n_cuda:
            raise error("device_unavailable", flag, available=available,
                        reason="this machine has %d CUDA device(s)" % n_cuda)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise error("device_unavailable", flag, available=available,
                        reason="MPS is not available on this machine")
    elif dev.type != "cpu":
        raise error("device_unavailable", flag, available=available,
                    reason="this code runs on cpu and cuda devices")


def check_data_name(data_name, data_path="DIR", where="--data_name"):
    """`--data_name` names a dataset (`<data_path>/<data_name>/`, `<data_name>_vocab.json`):
    a path there would make os.path.join drop --data_path and --vocab_path, and a trailing
    slash name the vocabulary `_vocab.json`."""
    seps = "/" + os.sep + (os.altsep or "")
    if data_name and not any(c in data_name for c in seps) and data_name not in (".", ".."):
        return
    head, tail = os.path.split(data_name.rstrip(seps))
    raise error("data_name", "%s %s" % (where, data_name), head=head or data_path,
                tail=tail or "NAME")


def _file_in_the_way(path):
    """`path`, or its nearest existing ancestor, when it exists and is not a directory (no
    directory can be made there); else None."""
    p = os.path.normpath(path)
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p if p and os.path.exists(p) and not os.path.isdir(p) else None


def check_dir(path, where, expected, exists=True):
    """`path` is a directory (`exists`), or one can be made there (missing directories are
    created by the writer): not a file, and no file in the way."""
    if not path:
        raise error("dir_missing", where, expected=expected)
    blocked = _file_in_the_way(path)
    if blocked:
        raise error("path_not_dir", where, found=blocked, expected=expected)
    if exists and not os.path.isdir(path):
        raise error("dir_missing", where, expected=expected)


def check_not_dir(path, where, expected):
    """`path` names a file to read or write, not a directory."""
    if os.path.isdir(path):
        raise error("path_not_file", where, expected=expected)


# ----------------------------------------------------------------------------- train.py's flags

_POSITIVE = ("num_epochs", "batch_size", "log_step", "val_step", "img_dim", "word_dim",
             "embed_size", "num_layers")
_NONNEGATIVE = ("workers", "grad_clip", "seed")


def check_train_opt(opt):
    """Flags of train.py that cannot work together, its device and its paths. (The matcher's
    own flags are checked by its class's `check_opt`; where the run writes, by `check_run`.)"""
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
    check_device(opt.device)
    check_data_name(opt.data_name, opt.data_path)
    check_dir(opt.data_path, "--data_path %s" % opt.data_path, exists=False,
              expected="the directory that holds <data_name>/")
    check_dir(opt.vocab_path, "--vocab_path %s" % opt.vocab_path, exists=False,
              expected="the directory that holds <data_name>_vocab.json")
    check_dir(opt.model_name, "--model_name %s" % opt.model_name, exists=False,
              expected="a directory for the checkpoints (created if missing)")
    check_dir(opt.logger_name, "--logger_name %s" % opt.logger_name, exists=False,
              expected="a directory for the TensorBoard logs (created if missing)")


def check_run(opt, ckpt=None):
    """Where train.py writes, before any compute: never over another run's checkpoints or
    TensorBoard logs unless `--overwrite`; a resumed run neither writes over the later epochs
    of its directory nor has nothing left to train. Returns the files of the run it replaces,
    which train.py removes at its first checkpoint (so that no file of the earlier run stays
    beside its own, and no advice points at one)."""
    resumed = None
    if ckpt is not None:
        resumed = int(ckpt.get("epoch", 0))
        if resumed >= opt.num_epochs:
            raise error("resume_done", opt_where(opt, "num_epochs"), path=opt.resume,
                        epochs=resumed)
    stale = check_run_dir(opt.model_name, opt.resume, opt.overwrite, resumed)
    return stale + check_log_dir(opt.logger_name, opt.model_name, bool(opt.resume),
                                 opt.overwrite)


_CKPT_NAME = re.compile(r"checkpoint_(\d+)\.pth\.tar")
BEST = "model_best.pth.tar"


def run_checkpoints(model_name):
    """The `checkpoint_N.pth.tar` files of a run directory, as [(N, path)] by N."""
    if not os.path.isdir(model_name):
        return []
    found = [(int(m.group(1)), os.path.join(model_name, n)) for n in os.listdir(model_name)
             for m in [_CKPT_NAME.fullmatch(n)] if m]
    return sorted(found)


def _same_path(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def check_run_dir(model_name, resume="", overwrite=False, resumed_epochs=None):
    """Refuse a `--model_name` that holds another run's checkpoints (its model_best.pth.tar
    would be replaced), unless `--overwrite`; a run resumed from a checkpoint of that
    directory (after `resumed_epochs` epochs; read from a checkpoint_N name when not given)
    may go on there, but not over checkpoints of later epochs. Returns the files that the run
    replaces (see check_run)."""
    ckpts = run_checkpoints(model_name)
    best = os.path.join(model_name, BEST)
    files = [p for _, p in ckpts] + ([best] if os.path.isfile(best) else [])
    if not files:
        return []
    same_run = bool(resume) and _same_path(os.path.dirname(os.path.abspath(resume)),
                                           model_name)
    if not same_run:
        if overwrite:
            return files
        names = ([BEST] if os.path.isfile(best) else []) + [os.path.basename(p)
                                                            for _, p in ckpts[-1:]]
        raise error("run_exists", model_name, found=" and ".join(names),
                    latest=os.path.basename(ckpts[-1][1] if ckpts else best))
    if resumed_epochs is None:
        m = _CKPT_NAME.fullmatch(os.path.basename(resume))
        resumed_epochs = int(m.group(1)) + 1 if m else None
    later = [p for n, p in ckpts if resumed_epochs is not None and n >= resumed_epochs]
    if not later:
        return []
    if not overwrite:
        names = [os.path.basename(p) for p in later]
        found = names[-1] + (" and %d more" % (len(names) - 1) if len(names) > 1 else "")
        raise error("run_later", "--model_name %s" % model_name, found=found,
                    resumed=os.path.basename(resume), epochs=resumed_epochs, latest=later[-1])
    # model_best.pth.tar may be of a later epoch too: then it goes with them
    if os.path.isfile(best) and not _same_path(best, resume) and \
            _epochs_of(best) not in range(resumed_epochs + 1):
        later.append(best)
    return later


def _epochs_of(path):
    """The epoch count saved in a checkpoint, or None when it cannot be read."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"])
    except Exception:  # a damaged or foreign file: not one this run can keep
        return None


TB_EVENTS = "events.out.tfevents."


def check_log_dir(logger_name, model_name, resume=False, overwrite=False):
    """Refuse a `--logger_name` that holds TensorBoard logs of another run (the two runs'
    curves would mix in one directory), unless `--overwrite`. A resumed run continues the
    logs of its own run (train.py marks the directory with its `--model_name`). Returns the
    event files that the run replaces (see check_run)."""
    if not os.path.isdir(logger_name):
        return []
    events = sorted(os.path.join(logger_name, n) for n in os.listdir(logger_name)
                    if n.startswith(TB_EVENTS))
    if not events:
        return []
    record = made_record(logger_name) or {}
    owner = record.get("model_name") if record.get("made_by") == "train.py" else None
    if resume and (owner is None or _same_path(owner, model_name)):
        return []
    if overwrite:
        return events
    owner = _shown(owner) if owner else None
    raise error("log_exists", "--logger_name %s" % logger_name,
                owner="the run in %s" % owner if owner else "another run")


def _shown(path):
    """A path as the user would write it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def remove_files(paths, keep=()):
    """Remove the files of a replaced run (check_run), except those just written."""
    keep = {os.path.realpath(p) for p in keep}
    for path in paths:
        if os.path.realpath(path) not in keep:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def check_last_batch(n_captions, batch_size):
    """A shuffled epoch whose last batch holds one pair crashes in BatchNorm1d at the end of
    the first epoch; say so before training."""
    if batch_size > 1 and n_captions % batch_size == 1:
        suggest = next(b for b in (batch_size - 1, batch_size + 1, batch_size + 2)
                       if n_captions % b != 1)
        raise error("batch_remainder", "--batch_size %d" % batch_size, n=n_captions,
                    suggest=suggest)


def check_fold5(fold5, n_images, split, n_caps=None, needed=5000):
    """COCO 5-fold 1K: 5000 images (`needed`) with their 25000 captions (five folds of
    1000 x 5000)."""
    n_caps = 5 * n_images if n_caps is None else n_caps
    if fold5 and (n_images != needed or n_caps != 5 * needed):
        raise error("fold5", "--fold5", split=split, n_images=n_images, n_caps=n_caps,
                    needed=needed)


def check_eval_captions(n_images, n_caps, where):
    """R@K (i2t, t2i) reads captions 5i..5i+4 as those of image i."""
    if n_caps != 5 * n_images:
        raise error("eval_captions", where, n_images=n_images, n_caps=n_caps)


# ----------------------------------------------------------------------------- data

def _expected(split):
    return "%s_ims.npy (or %s.h5) and %s_caps.txt" % (split, split, split)


def check_split_files(data_path, split, feat_path, cap_path):
    """The dataset directory and the two files of a split exist."""
    if not os.path.isdir(data_path):
        check_dir(data_path, data_path, exists=False, expected="the directory of the dataset")
        parent = os.path.dirname(os.path.normpath(data_path))
        if parent and os.path.isfile(os.path.join(parent, os.path.basename(cap_path))):
            # --data_path named the dataset's directory itself, not the one above it
            raise error("data_dir_nested", data_path, parent=parent,
                        split=split, above=os.path.dirname(parent) or ".",
                        name=os.path.basename(parent))
        raise error("data_dir", data_path, expected=_expected(split) + " (train and dev to "
                    "train; test or testall to evaluate)")
    for path in (feat_path, cap_path):
        check_not_dir(path, path, expected="a file: move the directory away")
    missing = [os.path.basename(p) for p in (feat_path, cap_path) if not os.path.isfile(p)]
    if missing:
        found = sorted(os.listdir(data_path))
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise error("split_missing", data_path, missing=" and ".join(missing),
                    found=shown or "nothing", expected=_expected(split))


def sample_indices(n, k=N_SAMPLE_IMAGES):
    """k image indices evenly spaced over n, first and last included."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))})


def check_features_finite(images, path, sample=N_SAMPLE_IMAGES, chunk=256):
    """No NaN/Inf in `images` (N, R, img_dim): a sample of images, or all (`sample=None`)."""
    n = len(images)
    if sample is not None:
        indices = sample_indices(n, sample) if sample else []
        for i in indices:
            if not np.isfinite(np.asarray(images[i], dtype=np.float32)).all():
                raise error("features_nonfinite", path, index=i,
                            checked="found in a sample of %d images" % len(indices))
        return
    bad, _, _ = scan_features(images, chunk)
    if bad is not None:
        raise error("features_nonfinite", path, index=bad, checked="all %d images checked" % n)


def scan_features(images, chunk=256):
    """One pass over every image: (the first image with NaN/Inf or None, the number of images
    with an all-zero region, the first (image, region) all zero or None)."""
    bad, n_zero, first_zero = None, 0, None
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float32)   # (b, R, img_dim)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if bad is None and not finite.all():
            bad = start + int(np.argmin(finite))
        zero = ~(block != 0).any(axis=2)                                   # (b, R)
        n_zero += int(zero.any(axis=1).sum())
        if first_zero is None and zero.any():
            i, r = np.argwhere(zero)[0]
            first_zero = (start + int(i), int(r))
    return bad, n_zero, first_zero


def warn_zero_regions(images, path, sample=N_SAMPLE_IMAGES):
    """An all-zero region vector in a sample of the training images: its embedding starts with
    norm 0 (the encoders' biases start at 0), where the l2 normalisation has no gradient, so
    training stops at the first batch that holds it. Warned, not refused: evaluation, and a
    resumed model (whose bias moved), are fine with it."""
    if images is None or getattr(images, "ndim", 0) != 3 or not len(images):
        return
    indices = sample_indices(len(images), sample)
    for i in indices:
        zero = ~(np.asarray(images[i]) != 0).any(axis=1)                   # (R,)
        if zero.any():
            log.warning(message("features_zero_region", path, index=i,
                                region=int(np.argmax(zero)),
                                checked="found in a sample of %d images" % len(indices)))
            return


def check_features(images, path, img_dim=None, sample=N_SAMPLE_IMAGES, regions=None):
    """Shape and dtype from the header (no data read), then NaN/Inf on `sample` images (all
    with None, none with 0). `regions`: (count, why) when the model needs that many regions per
    image."""
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
    another vocabulary format), with a VocabError for a missing or malformed file, and its ids
    checked (`check_vocab_ids`)."""
    data_name = re.sub(r"(_vocab)?\.json$", "", os.path.basename(path))
    blocked = _file_in_the_way(os.path.dirname(path))
    if blocked:
        raise error("path_not_dir", path, found=blocked,
                    expected="the directory that holds %s" % os.path.basename(path))
    check_not_dir(path, path, expected="the directory that holds it as --vocab_path")
    if not os.path.isfile(path):
        raise error("vocab_missing", path, name=os.path.basename(path), data_name=data_name)
    try:
        vocab = loader(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        reason = ("no %s entry" % e) if isinstance(e, KeyError) else first_line(e)
        raise error("vocab_invalid", path, reason=reason, data_name=data_name) from None
    word2idx = getattr(vocab, "word2idx", None)
    if not isinstance(word2idx, dict):
        raise error("vocab_invalid", path, data_name=data_name,
                    reason="word2idx is a %s, not a mapping" % type(word2idx).__name__)
    missing = [t for t in SPECIAL_TOKENS if t not in word2idx]
    if missing:
        raise error("vocab_invalid", path, reason="no %s token" % missing[0],
                    data_name=data_name)
    reason = vocab_ids_problem(word2idx)
    if reason:
        raise error("vocab_invalid", path, reason=reason, data_name=data_name)
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


# ------------------------------------------------------------------------ what a command writes
#
# One rule for every file a command writes (checkpoints, logs, similarity matrices,
# vocabularies, h5 files, plots, caches, demo data and runs): never over a file or a run that it
# did not make unless the user asked (--overwrite), and the vocabularies shipped in vocab/ are
# never rewritten by default. What this project made is recorded in a marker file, MARKER, in
# the directory that holds it: a directory's own record (e.g. demo.py's run directory, the log
# directory of train.py's run) and one per file (valid while the file keeps the size and
# modification time recorded, so a file the user replaced afterwards is theirs). Every file is
# written to a temporary `.<name>~<host>~<pid>.partial` beside it and renamed at the end
# (`atomic_output`); the partial files of killed runs are removed by the next write there.

MARKER = ".made_by.json"
# sha256 -> the files shipped in vocab/ (the originals' vocabularies)
SHIPPED = {
    "ece46633bedb157d3430716d2fe8c90d2631895c97eb5eebfc5c1c3e04ebca44":
        "vocab/f30k_precomp_vocab.json",
    "91b208d4673b076bdb3fc8a1441eb4b55cadc6f5be0137d89672f4abd21c9541":
        "vocab/coco_precomp_vocab.json",
    "aa5b83eb7a89b579052ee94b870cc68ea24c37eaf728c07626bc08edd50cd3e7":
        "vocab/naaf/f30k_precomp.json",
    "a855f2ae6f67cac6e7d6b235e93e9c74e2aa2060543c61ad39908218e6b8433a":
        "vocab/naaf/coco_precomp.json",
}


def _read_marker(directory):
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def made_record(path):
    """What a command of this project recorded when it made `path` (a directory, or a file
    still as it was written): a dict with `made_by` (e.g. "np2h.py") and what the maker
    stored with it; None for anything else."""
    if os.path.isdir(path):
        record = _read_marker(path).get("dir")
        return record if isinstance(record, dict) else None
    if not os.path.isfile(path):
        return None
    directory, name = os.path.split(os.path.abspath(path))
    record = _read_marker(directory).get("files", {}).get(name)
    st = os.stat(path)
    if isinstance(record, dict) and record.get("size") == st.st_size and \
            record.get("mtime_ns") == st.st_mtime_ns:
        return record
    return None


def mark_made(path, made_by, **info):
    """Record that the command `made_by` made `path` (a directory, or a file it has just
    written), with `info` (json values) for it to recognise the file later."""
    path = os.path.abspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    marker = _read_marker(directory)
    record = dict(info, made_by=made_by)
    if directory == path:
        marker["dir"] = record
    else:
        st = os.stat(path)
        record.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
        files[os.path.basename(path)] = record
        marker["files"] = files
    text = json.dumps(marker, indent=1, sort_keys=True) + "\n"
    with atomic_output(os.path.join(directory, MARKER)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def shipped_file(path):
    """The shipped file that `path` is a copy of (by content), or None."""
    names = {os.path.basename(v) for v in SHIPPED.values()}
    if os.path.basename(path) not in names or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return SHIPPED.get(hashlib.sha256(f.read()).hexdigest())


def check_output_file(path, where=None, made_by=None, overwrite=False,
                      alternative="another path", expected="a file name"):
    """The rule, checked before the compute, for a file that a command will write: `path` is
    not a directory and no file is in the way of its directory; an existing file is refused
    unless `overwrite`, or unless `made_by` made it (its record is returned: the caller may
    reuse it, resume it or replace it). A shipped vocabulary gets its own message.
    `alternative` completes the fix ("pass --overwrite to replace it, or ...")."""
    where = where or path
    check_not_dir(path, where, expected=expected)
    blocked = _file_in_the_way(os.path.dirname(path))
    if blocked:
        raise error("path_not_dir", where, found=blocked,
                    expected="a path whose directories are directories")
    if not os.path.lexists(path):
        return None
    record = made_record(path)
    if overwrite or (made_by is not None and record and record.get("made_by") == made_by):
        return record
    shipped = shipped_file(path)
    if shipped:
        raise error("file_shipped", where, what="file %s" % shipped, alternative=alternative)
    detail = " (written by %s)" % record["made_by"] if record else ""
    raise error("file_exists", where, detail=detail, alternative=alternative)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_partials(directory):
    """Remove the partial files that killed runs on this machine left in `directory`
    (`.<name>~<host>~<pid>.partial` of a process that is gone)."""
    host = socket.gethostname()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".") and name.endswith(PARTIAL)):
            continue
        parts = name[1:-len(PARTIAL)].rsplit("~", 2)
        if len(parts) == 3 and parts[1] == host and parts[2].isdigit() and \
                not _alive(int(parts[2])):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


@contextlib.contextmanager
def atomic_output(path):
    """Write `path` through a temporary path beside it (the block writes the file there):
    renamed to `path`, fsynced, when the block ends, removed when it raises. A killed process
    leaves its partial file, which the next atomic_output in that directory removes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_partials(directory)
    tmp = partial_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


# what a checkpoint may pickle besides tensors and plain containers
SAFE_GLOBALS = [argparse.Namespace]


def atomic_save(obj, path):
    """torch.save to a partial file in the target's directory, fsynced, then renamed over the
    target (atomic_output): a crash never leaves a half-written file behind."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


# ----------------------------------------------------------------------------- outputs

# The record beside an output file: "<output>.record"
RECORD_SUFFIX = ".record"


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's contents: what identifies a checkpoint or a data file in a record
    (a copy or a move keeps it; a retrained or regenerated file changes it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _short(value):
    text = value if isinstance(value, str) else json.dumps(value)
    if re.fullmatch(r"[0-9a-f]{64}", text):  # a digest: its first 12 digits are enough
        text = text[:12]
    return text if len(text) <= 40 else text[:37] + "..."


def identity_change(ours, theirs):
    """The first entry in which two identities (dicts) differ, as `name X here, Y in its
    record`, or None when they are equal."""
    for key in list(ours) + [k for k in theirs if k not in ours]:
        if ours.get(key) != theirs.get(key):
            return "%s %s here, %s in its record" % (key, _short(ours.get(key, "none")),
                                                      _short(theirs.get(key, "none")))
    return None


class OutputRecord:
    """The record that this project's tools keep beside an output file they write, as
    `<output>.record`: JSON lines, the first saying what the output is made of (`identity`: the
    contents of the inputs and the options that determine it, plus `info` for the reader),
    each later one an entry appended when a part of the output is finished (flushed and
    fsynced, after the output's part itself). It is what makes an output "ours": a rerun of
    the same command may continue or reuse it, anything else is refused (`claim_output`).
    While a run writes, it holds an exclusive lock on the record."""

    def __init__(self, path, file, header, entries):
        self.path, self.record_path = path, path + RECORD_SUFFIX
        self._file, self.header, self.entries = file, header, entries

    @property
    def identity(self):
        return self.header["identity"]

    def append(self, entry):
        """Add one entry (a JSON-serialisable dict), durably."""
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries.append(entry)

    def close(self):
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None


def read_record(record_path):
    """(header, entries) of a record file, or None when it is not one. A last line cut short
    by a crash is ignored."""
    try:
        with open(record_path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    parsed = []
    for line in lines[:-1]:  # the part after the last newline is an unfinished line
        try:
            parsed.append(json.loads(line))
        except ValueError:
            break
    if not parsed or not isinstance(parsed[0], dict) or "identity" not in parsed[0]:
        return None
    return parsed[0], [e for e in parsed[1:] if isinstance(e, dict)]


def check_output_path(path, flag):
    """The directory of an output exists and the path is not a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise error("output_dir", directory, flag=flag)
    if os.path.isdir(path):
        raise error("output_not_ours", path, why="it is a directory", flag=flag)


def claim_output(path, identity, flag, overwrite=False, info=None):
    """Take `path` as this run's output, before any compute, or refuse it with a one-line
    error, writing nothing:
      - `path` does not exist, or `overwrite`: a fresh record (its header written);
      - `path` exists with a record of the same `identity`: the record, with the entries of
        the earlier run, so the caller continues (or reuses) what it finished;
      - `path` exists with no record beside it (a file of the user's, or of a tool that keeps
        none): `output_not_ours`; with a record of another identity: `output_other_run`;
        with a record another process holds: `output_busy`.
    Returns an OutputRecord, locked until closed. `flag` names the option in the messages
    (e.g. `--save_sims`). Retrieval caches and figures use it as `--save_sims` does."""
    check_output_path(path, flag)
    rec = path + RECORD_SUFFIX
    exists = os.path.exists(path)
    if exists and not overwrite and not os.path.isfile(rec):
        raise error("output_not_ours", path, flag=flag,
                    why="no %s beside it" % os.path.basename(rec))
    f = open(rec, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error("output_busy", path, flag=flag) from None
        except OSError:  # a file system without locks: go on unlocked
            pass
        old = read_record(rec) if exists and not overwrite else None
        if exists and not overwrite:
            if old is None:
                raise error("output_not_ours", path, flag=flag,
                            why="%s is not a record" % os.path.basename(rec))
            change = identity_change(identity, old[0]["identity"])
            if change is not None:
                raise error("output_other_run", path, flag=flag, change=change)
            f.seek(0)
            text = f.read()
            if not text.endswith("\n"):  # drop a line that a crash cut short
                f.truncate(text.rfind("\n") + 1)
            return OutputRecord(path, f, old[0], old[1])
        # a fresh record; a record left without its output (deleted) describes nothing, but
        # a file of that name that is not a record is the user's
        if not exists and not overwrite and os.path.getsize(rec) and read_record(rec) is None:
            raise error("output_not_ours", rec, flag=flag, why="it is not a record")
        header = {"record": 1, "output": os.path.basename(path), "identity": identity,
                  "info": info or {}}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(header, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
        return OutputRecord(path, f, header, [])
    except BaseException:
        f.close()
        if os.path.exists(rec) and os.path.getsize(rec) == 0:
            os.remove(rec)  # made by the open above: leave nothing behind
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
    return first_line(m.group(1).strip()) if m else first_line(exc)


def explain_load_failure(path, exc):
    """The CheckpointError for a file that `torch.load(weights_only=True)` could not load."""
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    name = refused.group(1).rstrip(".") if refused else None
    if _python2_strings(path) or (name and name.split(".")[0] in _PY2_MODULES):
        reason = ("Python 2 strings in its pickle" if not name else
                  "it pickles the Python 2 global %s" % name)
        return error("ckpt_py2", path, reason=reason, name=os.path.basename(path))
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
        raise error("ckpt_py2", path, reason="its options hold byte strings",
                    name=os.path.basename(path))


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
        raise error("vocab_size", vocab_file, n_vocab=have["vocab_size"],
                    checkpoint=os.path.basename(path),
                    n_ckpt=want["vocab_size"])
    parts = ["%s in the checkpoint, %s from the flags"
             % (flag_text(k, want[k]), flag_text(k, have[k]))
             for k in differ if k != "vocab_size" and have.get(k) is not None]
    if "vocab_size" in differ:
        parts.append("a vocabulary of %d words, %s has %s" % (want["vocab_size"], vocab_file,
                                                              have.get("vocab_size")))
    if count:
        parts.append(count)
    flags = [flag_text(k, want[k]) for k in differ if k != "vocab_size"]
    if flags:  # the flags say it all: how many keys differ, not which
        counts = [("%d keys missing", missing), ("%d keys unexpected", unexpected),
                  ("%d keys of other shapes", shapes)]
        summary = ", ".join(text % len(keys) for text, keys in counts if keys)
        if summary:
            parts.append(summary)
    else:
        if missing:
            parts.append("missing keys %s" % _some(missing, 1))
        if unexpected:
            parts.append("unexpected keys %s" % _some(unexpected, 1))
        if shapes:
            parts.append("shapes (checkpoint vs flags) %s" % _some(shapes, 1))
    if flags and "vocab_size" in differ:
        flags.append("and its vocabulary")
    if not flags:
        raise error("ckpt_foreign", path, diff="; ".join(parts), model=model.opt.module_name)
    raise error("ckpt_mismatch", path, diff="; ".join(parts), flags=" ".join(flags))


def convert_py2_checkpoint(src, dst, overwrite=False):
    """Re-save a checkpoint of the original python2.7 branch for Python 3, still loading it
    with weights_only (nothing in it is run). Its byte strings are read as UTF-8 where they
    are, else as Latin-1. Never writes over an existing file unless `overwrite`; the
    directory of `dst` is created."""
    check_not_dir(src, src, expected="the checkpoint file to convert")
    if not os.path.isfile(src):
        raise error("ckpt_missing", src)
    check_output_file(dst, overwrite=overwrite, expected="the file to write (NEW.pth.tar)")
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
    nothing is saved (train.py then says why: explain_divergence). One pass over the
    gradients per step."""
    def hook(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        loss = model.logger.meters["Loss"].val if "Loss" in model.logger.meters else None
        loss_bad = loss is not None and not math.isfinite(loss)
        if loss_bad or (grads and not bool(torch.stack([g.isfinite().all()
                                                        for g in grads]).all())):
            what = ("loss is %s" % loss if loss_bad else
                    "gradients are not finite (loss %.4g)" % loss if loss is not None else
                    "gradients are not finite")
            raise error("diverged_start", model.opt.model_name, what=what,
                        iteration=model.Eiters)
    return model.optimizer.register_step_pre_hook(hook)


def check_loss(loss, iteration, where):
    """A non-finite loss returned by a train step (for a step that was not stopped before)."""
    value = float(loss)
    if not math.isfinite(value):
        raise error("diverged_start", where, what="loss is %s" % value, iteration=iteration)


def diagnose_images(images):
    """What in a batch's image features (B, R, img_dim) makes a model's loss or gradients
    non-finite: ("nonfinite", item, None), ("zero_region", item, region) or None."""
    if images is None:
        return None
    x = torch.as_tensor(images)
    if x.dim() != 3 or not x.is_floating_point():
        return None
    x = x.detach().cpu()
    finite = torch.isfinite(x).flatten(1).all(1)                            # (B,)
    if not finite.all():
        return "nonfinite", int((~finite).nonzero()[0]), None
    zero = ~(x != 0).any(2)                                                 # (B, R)
    if zero.any():
        item, region = zero.nonzero()[0].tolist()
        return "zero_region", item, region
    return None


def explain_divergence(exc, last=None, images=None, image_ids=None, features="the features"):
    """The error of a run that diverged (`exc`, raised by stop_on_nonfinite or check_loss):
    what the batch's features hold that explains it (NaN/Inf, an all-zero region: image
    `image_ids[item]` of the file `features`), else the advice that applies: `--resume` only
    when the run has a checkpoint (`last`)."""
    what, iteration = exc.fields["what"], exc.fields["iteration"]
    found = diagnose_images(images)
    if found:
        kind, item, region = found
        image = image_ids[item] if image_ids is not None else item
        return error("diverged_nonfinite" if kind == "nonfinite" else "diverged_zero_region",
                     features, image=image, region=region, what=what, iteration=iteration)
    if last:
        return error("diverged", exc.where, what=what, iteration=iteration, last=last)
    return error("diverged_start", exc.where, what=what, iteration=iteration)


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
        "`<file or flag>: <problem>; <fix>`, printed as `error: ...` by every command (train.py,",
        "evaluation.py, retrieve.py, demo.py, vocab.py, np2h.py, synthetic.py, bench.py,",
        "checks.py) before any compute, with the exit code below; no existing file is written.",
        "Warnings and reports are logged and the run goes on.",
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
    p = ArgumentParser(prog="checks.py", description="SGRAF input checks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--table", action="store_true", help="print TROUBLESHOOTING.md")
    g.add_argument("--features", nargs="+", metavar="FILE",
                   help="check every image of feature files (.npy or .h5) for NaN/Inf, and "
                        "count the images with an all-zero region")
    g.add_argument("--convert-py2", nargs=2, metavar=("OLD", "NEW"),
                   help="re-save a checkpoint of the original python2.7 branch")
    p.add_argument("--img_dim", type=int, default=None, help="expected feature dimension")
    p.add_argument("--overwrite", action="store_true",
                   help="--convert-py2: replace NEW if it exists")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    check_positive(args, ["img_dim"])
    if args.table:
        sys.stdout.write(render_table())
    elif args.features:
        for path in args.features:
            check_not_dir(path, path, expected="a feature file ({split}_ims.npy or {split}.h5)")
            if not os.path.isfile(path):
                raise error("features_missing", path)
            images = open_features(path)
            check_features(images, path, args.img_dim, sample=0)
            bad, n_zero, first_zero = scan_features(images)
            if bad is not None:
                raise error("features_nonfinite", path, index=bad,
                            checked="all %d images checked" % len(images))
            print("%s: %s images of shape %s, all finite" % (path, len(images),
                                                             tuple(images.shape[1:])))
            if n_zero:
                print("warning: " + message(
                    "features_zero_region", path, index=first_zero[0], region=first_zero[1],
                    checked="the first of %d such images" % n_zero))
    else:
        convert_py2_checkpoint(*args.convert_py2, overwrite=args.overwrite)
        print("wrote %s" % args.convert_py2[1])
    return 0


@exit_on_error
def vocab_command(argv=None):
    """`python vocab.py` (its main guard runs this; vocab.py cannot import this module, which
    imports it): build `<vocab_path>/<data_name>_vocab.json` from the train and dev captions
    (vocab.build_vocab). Every check is made before the captions are read, and no existing
    vocabulary is replaced unless `--overwrite` (the shipped vocab/ files included): the
    checkpoints trained with it would no longer fit. A vocabulary that vocab.py built from the
    same caption files and threshold is up to date, and left as it is."""
    p = ArgumentParser(prog="vocab.py", description="Build a SCAN/SGRAF vocabulary json.")
    p.add_argument("--data_path", default="data")
    p.add_argument("--data_name", default="f30k_precomp", help="{coco,f30k}_precomp")
    p.add_argument("--vocab_path", default="vocab",
                   help="directory the <data_name>_vocab.json is written to")
    p.add_argument("--threshold", type=int, default=4,
                   help="minimum word count to enter the vocabulary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing <data_name>_vocab.json")
    opt = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_min(opt, "threshold", 1, "the number of times a word must be seen")
    check_data_name(opt.data_name, opt.data_path)
    check_dir(opt.data_path, "--data_path %s" % opt.data_path,
              expected="the directory that holds <data_name>/")
    loc = os.path.join(opt.data_path, opt.data_name)
    expected = " and ".join(DEFAULT_CAPTION_FILES)
    if not os.path.isdir(loc):
        check_dir(loc, loc, exists=False, expected="the directory of the dataset")
        if os.path.isfile(os.path.join(opt.data_path, DEFAULT_CAPTION_FILES[0])):
            parent = os.path.normpath(opt.data_path)
            raise error("data_dir_nested", loc, parent=parent, split="train",
                        above=os.path.dirname(parent) or ".", name=os.path.basename(parent))
        raise error("data_dir", loc, expected=expected)
    files = [os.path.join(loc, n) for n in DEFAULT_CAPTION_FILES]
    for path in files:
        check_not_dir(path, path, expected="a caption file: move the directory away")
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        found = sorted(os.listdir(loc))
        raise error("split_missing", loc, missing=" and ".join(missing),
                    found=", ".join(found[:8]) + (" ..." if len(found) > 8 else "") or
                    "nothing", expected=expected)
    check_dir(opt.vocab_path, "--vocab_path %s" % opt.vocab_path, exists=False,
              expected="a directory for the vocabulary (created if missing)")
    dest = os.path.join(opt.vocab_path, "%s_vocab.json" % opt.data_name)
    sources = {os.path.abspath(f): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}
    record = check_output_file(dest, made_by="vocab.py", overwrite=opt.overwrite,
                               alternative="another --vocab_path")
    if record and not opt.overwrite:
        if record.get("captions") == sources and record.get("threshold") == opt.threshold:
            print("%s is up to date (built by vocab.py from the same captions)" % dest)
            return 0
        raise error("file_exists", dest, alternative="another --vocab_path",
                    detail=" (built by vocab.py from other captions or another --threshold)")
    vocab = build_vocab(opt.data_path, opt.data_name, threshold=opt.threshold)
    os.makedirs(opt.vocab_path, exist_ok=True)
    serialize_vocab(vocab, dest)
    mark_made(dest, "vocab.py", captions=sources, threshold=opt.threshold)
    print("Saved vocabulary file to", dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
