"""Errors: every mistake a command can report, as one line, and the checks of flags and paths.

Every mistake is reported as one line, `<file or flag>: <problem>; <fix>`, by an `SGRAFError`
raised before hours of compute are spent, and without writing to any file the user already
has. Every command's main is wrapped in `exit_on_error`: it prints `error: <message>` to
stderr and exits with the error's code (2 for usage, data, vocabulary, checkpoint and
run-directory errors, as argparse does; 1 for a run that diverged); their parsers are
`ArgumentParser`, whose own errors (unknown flags and choices, bad values) are such lines too.
Library functions raise and never exit. A line stays within MAX_LINE characters whatever its
paths: a long path is shortened in the middle (`/very/long/…/run/model_best.pth.tar`), and
the problem and its fix are kept.

All messages are defined in `PROBLEMS` below; `TROUBLESHOOTING.md` is generated from them
(`checks.render_table`):
    python checks.py --table > TROUBLESHOOTING.md

This is the bottom of the project's imports: it imports only the standard library (the
device check, which needs torch, is distributed.check_device), and it knows no matcher; what is specific to one reaches the
checks of the files that guard it (data.py, vocab.py, checkpoint.py, runs.py) as arguments.
"""
import argparse
import errno
import functools
import os
import re
import signal
import sys
from collections import namedtuple


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
    """Missing or malformed dataset files."""


class VocabError(SGRAFError):
    """A vocabulary file that is missing, malformed or of another dataset."""


class CheckpointError(SGRAFError):
    """A checkpoint that cannot be used."""


class DivergedError(SGRAFError):
    """The loss or the gradients stopped being finite during training."""
    exit_code = 1


class Interrupted(SGRAFError):
    """Ctrl-C: the line says what is saved and how to continue (exit code 130, as a shell's)."""
    exit_code = 130


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
    "features_pickled": Problem(
        DataError, "a pickled object array, not a numeric .npy (dtype {dtype})",
        "save the features as one float32 array: np.save(path, np.asarray(feats, "
        "dtype=np.float32))"),
    "embeddings_nonfinite": Problem(
        DataError, "{what} {indices} encode to NaN or Inf with {model}",
        "check those {what} in the split's files (`python checks.py --features FILE` checks "
        "every image) and the checkpoint; no result is printed from non-finite scores"),
    "scores_nonfinite": Problem(
        DataError, "images {images} x captions {captions} score NaN or Inf",
        "check those images and captions and the checkpoint; no result is printed from "
        "non-finite scores"),
    "oov_refused": Problem(
        DataError, "{rate:.1f}% of caption tokens are not in the vocabulary {vocab}{hint}",
        "the wrong vocabulary or encoding: check --vocab_path and --data_name, and that the "
        "file is UTF-8"),
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
    "sims_rescored": Problem(
        Warn, "{n} of the {n_recorded} shards recorded in {record} do not match their "
        "checksum{lines}; they are scored again",
        "nothing to do: the rest of the matrix is kept"),
    "cache_damaged": Problem(
        Warn, "the cache entry is damaged ({why}); the split is encoded again and the entry "
        "replaced",
        "nothing to do; if it happens again, check the disk that holds --cache_dir"),
    "run_busy": Problem(
        UsageError, "another train.py (pid {pid}) is running in this directory",
        "wait for it to finish (or stop it), or pass another {flag}"),
    "write_failed": Problem(
        DataError, "could not be written ({reason}); {kept}",
        "{fix}"),
    "interrupted": Problem(
        Interrupted, "interrupted (Ctrl-C); {saved}", "{how}"),
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
    # --------------------------------------------------------------- serve.py
    "serve_host": Problem(
        Warn, "the server is reachable from other machines: anyone who can reach it can "
        "query the model and read the split's captions and images",
        "pass --host 127.0.0.1 (the default) unless that is what you want"),
    "port_unavailable": Problem(
        UsageError, "cannot listen on {host} ({reason})",
        "pass another --port (--port 0 picks a free one) or stop what holds it"),
    "sims_foreign": Problem(
        UsageError, "is not a finished evaluation.py --save_sims of this gallery ({why})",
        "pass one of the same checkpoints, data and split, or drop --sims (to score the "
        "split at start-up)"),
    # --------------------------------------------------------------- two-stage retrieval
    "shortlist_unsupported": Problem(
        UsageError, "{model} cannot shortlist: {why}",
        "pass as --shortlist a dual encoder's checkpoint, one that embeds alone "
        "(docs/two_stage.md); --model_path re-ranks"),
    "rerank_needs_shortlist": Problem(
        UsageError, "re-ranks a shortlist, and no --shortlist is given",
        "pass --shortlist CKPT, a dual encoder's checkpoint, or drop --rerank_k for the "
        "exhaustive ranking"),
    "shortlist_needs_k": Problem(
        UsageError, "needs --rerank_k K, the number of candidates re-ranked per query",
        "pass e.g. --rerank_k 128, or several: --rerank_k 16,32,64,128"),
    "shortlist_split": Problem(
        UsageError, "reads {theirs}, the re-ranker reads {ours}: the shortlist must rank the "
        "same images and captions",
        "pass a shortlist checkpoint of the same data, or a --data_name both read"),
    "rerank_k_gallery": Problem(
        Warn, "K = {k} is at least the gallery of {direction} ({n} {items}): all of them are "
        "re-ranked, which is the exhaustive ranking",
        "pass a smaller K to score fewer pairs"),
    "cache_inside": Problem(
        UsageError, "is inside the {what} {inside}; the retrieval cache must not mix with data "
        "or checkpoints",
        "pass a --cache_dir outside it (the default is {default})"),
    "cache_unwritable": Problem(
        Warn, "the retrieval cache cannot be kept there ({reason}); the split is encoded "
        "without it", "pass a --cache_dir you can write to, or --no_cache"),
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
# a path shortened to fit a line keeps this many characters, its head and its tail, or fewer
# (PATH_MIN) only when the line would not fit otherwise
PATH_KEEP, PATH_MIN = 40, 16
# a path in a field: a run of characters with a separator, ended by a space or punctuation
_PATH = re.compile(r"[^\s,;()\[\]'\"]*/[^\s,;()\[\]'\"]*")


def shorten_path(path, width):
    """`path` in at most `width` characters: its head and its tail (the file name), the middle
    replaced by "…", cut at separators where it can: `/very/long/…/run/model_best.pth.tar`."""
    if len(path) <= width:
        return path
    tail = path[len(path) - (width - 1) * 2 // 3:]
    head = path[:width - 1 - len(tail)]
    if "/" in tail[:-1]:
        tail = tail[tail.index("/"):]
    if "/" in head[1:]:
        head = head[:head.rindex("/") + 1]
    return head + "…" + tail


def message(key, where, **fields):
    """The one-line message of a problem. A line that would pass MAX_LINE has its long paths
    shortened in the middle first (`shorten_path`), then its longest descriptive field (say a
    long list of differing keys) cut, never the `where` nor a field the fix needs: the problem
    and its fix stay whatever the length of the paths."""
    p, fields = PROBLEMS[key], dict(fields, where=where)

    def render():
        return "%s: %s; %s" % (fields["where"], p.problem.format(**fields),
                               p.fix.format(**fields))

    def over():
        return len(text) + len("error: ") - MAX_LINE

    def shorten_paths(keep):
        nonlocal text
        while over() > 0:
            paths = {t for v in fields.values() if isinstance(v, str) for t in _PATH.findall(v)
                     if len(t) > keep and "…" not in t[keep:]}
            if not paths:
                return
            path = max(paths, key=len)
            # a path may be named more than once (the file, and the fix that names it again)
            times = max(1, text.count(path))
            short = shorten_path(path, max(keep, len(path) - -(-over() // times)))
            for k, v in fields.items():
                if isinstance(v, str):
                    fields[k] = v.replace(path, short)
            text = render()
    text = render()
    shorten_paths(PATH_KEEP)
    in_fix = set(re.findall(r"\{(\w+)", p.fix)) | {"where"}
    cuttable = [k for k, v in fields.items() if isinstance(v, str) and k not in in_fix]
    while over() > 0:  # the longest field first, then the next
        longest = [k for k in cuttable if len(fields[k]) > 23]
        if not longest:
            break
        k = max(longest, key=lambda k: len(fields[k]))
        fields[k] = fields[k][:max(20, len(fields[k]) - over() - 3)].rstrip() + "..."
        cuttable.remove(k)
        text = render()
    shorten_paths(PATH_MIN)
    return text


def error(key, where, **fields):
    """The exception of a problem, for the caller to raise (so the traceback points there);
    `where` and `fields` stay on it (e.g. for a caller to say more)."""
    exc = PROBLEMS[key].cls(message(key, where, **fields), key=key)
    exc.where, exc.fields = where, fields
    return exc


# what each running command has saved, for the line a Ctrl-C prints: one entry per command
# main on the stack (demo.py runs train.py's main inside its own); the outermost one speaks
_INTERRUPT_NOTES = []
NOTHING_SAVED = ("nothing was written", "run the same command again")


def on_interrupt(saved, how):
    """What the running command has saved so far and how to continue from it, said by the one
    line that a Ctrl-C prints (`interrupted (Ctrl-C); <saved>; <how>`); a command updates it as
    it writes (e.g. train.py after every checkpoint)."""
    if _INTERRUPT_NOTES:
        _INTERRUPT_NOTES[-1][1:] = [saved, how]


def exit_on_error(main):
    """Wrap a CLI `main(argv)`: an SGRAFError prints `error: <message>` and exits with its
    code; a Ctrl-C (KeyboardInterrupt) prints one line, what is saved and how to continue
    (`on_interrupt`), and exits with 130; every other exception stays a traceback (it is a
    bug, not a usage error). Under torchrun rank 0 alone prints a shared error or a Ctrl-C;
    the other processes exit quietly."""
    name = os.path.basename(main.__globals__.get("__file__") or main.__module__ + ".py")

    @functools.wraps(main)
    def wrapper(argv=None):
        if not getattr(sys.excepthook, "quiet_resource_sharer", False):
            sys.excepthook = _quiet_resource_sharer(sys.excepthook)
        _INTERRUPT_NOTES.append([name, *NOTHING_SAVED])
        try:
            return main(argv)
        except SGRAFError as e:
            if not (e.shared and os.environ.get("RANK", "0") != "0"):
                print("error: %s" % e, file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt:
            if len(_INTERRUPT_NOTES) > 1:  # a command run inside another: the outer one says
                raise
            # a second Ctrl-C while the process exits: no traceback (a main called from
            # another program's code, a test's, gets its handler back)
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            where, saved, how = _INTERRUPT_NOTES[-1]
            if os.environ.get("RANK", "0") == "0":
                print("error: %s" % message("interrupted", where, saved=saved, how=how),
                      file=sys.stderr, flush=True)
            if main.__globals__.get("__name__") != "__main__":
                signal.signal(signal.SIGINT, previous)
            raise SystemExit(Interrupted.exit_code) from None
        finally:
            _INTERRUPT_NOTES.pop()
    return wrapper


def _quiet_resource_sharer(hook):
    """A sys.excepthook that drops the broken connections that multiprocessing's resource
    sharer (the thread that hands file descriptors to DataLoader workers) reports through
    sys.excepthook when a worker stops mid-handshake, as after a Ctrl-C: no bug to show.
    Anything else goes to `hook`."""
    def quiet(exc_type, exc, tb):
        sharer, frame = False, tb
        while frame is not None:
            sharer |= frame.tb_frame.f_code.co_filename.endswith("resource_sharer.py")
            frame = frame.tb_next
        if not (sharer and issubclass(exc_type, (EOFError, ConnectionError))):
            hook(exc_type, exc, tb)
    quiet.quiet_resource_sharer = True
    return quiet


def write_failure(exc):
    """The reason of an OSError that no retry can fix, as a line quotes it (`no space left
    on device`, `read-only file system`, `permission denied`), or None for any other."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
    return reasons.get(getattr(exc, "errno", None))


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


def flag_text(name, value):
    """A flag as the user would write it: `--name value`, `--name`, `--no-name`."""
    if isinstance(value, bool):
        return ("--%s" if value else "--no-%s") % name
    return "--%s %s" % (name, value)


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
    """A `sep`-separated list flag (e.g. bench.py's `--what eval,train`) names only known
    choices."""
    unknown = [v for v in str(getattr(opt, name)).split(sep) if v not in choices]
    if unknown:
        raise error("flag_choice", opt_where(opt, name), unknown=sep.join(unknown),
                    choices=sep.join(choices))


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


def file_in_the_way(path):
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
    blocked = file_in_the_way(path)
    if blocked:
        raise error("path_not_dir", where, found=blocked, expected=expected)
    if exists and not os.path.isdir(path):
        raise error("dir_missing", where, expected=expected)


def check_not_dir(path, where, expected):
    """`path` names a file to read or write, not a directory."""
    if os.path.isdir(path):
        raise error("path_not_file", where, expected=expected)


# ----------------------------------------------------------------------------- the table
