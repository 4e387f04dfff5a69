"""Reading and writing checkpoints in the original SGRAF format.

`{'epoch', 'model': [img_enc, txt_enc, sim_enc state dicts], 'best_rsum', 'opt': Namespace,
'Eiters'}` plus, in ours, `'optimizer'` (the Adam state) for resuming.

Loading never executes pickled code: `torch.load(weights_only=True)` with only
`argparse.Namespace` allowed besides tensors and plain containers. Saving writes a partial
file in the same directory and renames it over the target (outputs.atomic_output), so a crash
during a save never leaves a truncated checkpoint behind, and a killed run's partial file is
removed by the next save there. Each checkpoint is recorded as its command's
(outputs.made_record).

A checkpoint is checked before it is used: a file that torch cannot load is explained (a
truncated file, not a checkpoint, a refused pickled global, a checkpoint of the original
python2.7 branch, which `convert_py2_checkpoint` re-saves), then its structure
(`check_checkpoint_structure`), then, once a model is built from the flags, its keys and
shapes (`check_checkpoint_matches`, which names the flags that differ).
"""
import argparse
import os
import pickletools
import re
import shutil
import warnings
import zipfile

import torch

import errors
import outputs

# what a checkpoint may pickle besides tensors and plain containers
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint(path, map_location="cpu"):
    if os.path.isdir(path):
        best = os.path.join(path, "model_best.pth.tar")
        raise errors.error("path_not_file", path, expected="a checkpoint file in it, e.g. %s"
                           % best if os.path.isfile(best) else "a checkpoint file")
    if not os.path.isfile(path):
        raise errors.error("ckpt_missing", path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a refused pickled object
        raise explain_load_failure(path, e) from None
    check_checkpoint_structure(ckpt, path)
    return ckpt


def _atomic_copy(src, dst, made_by):
    with outputs.atomic_output(dst, made_by) as tmp:
        shutil.copyfile(src, tmp)


def save_checkpoint(state, is_best, filename="checkpoint.pth.tar", prefix="",
                    made_by="train.py"):
    """Write `prefix + filename` and, if `is_best`, `prefix + 'model_best.pth.tar'`, each
    atomically and recorded as the command `made_by`'s."""
    path = prefix + filename
    outputs.atomic_save(state, path, made_by)
    if is_best:
        _atomic_copy(path, prefix + "model_best.pth.tar", made_by)


# ----------------------------------------------------------------------------- checks

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
    return errors.first_line(m.group(1).strip()) if m else errors.first_line(exc)


def explain_load_failure(path, exc):
    """The CheckpointError for a file that `torch.load(weights_only=True)` could not load."""
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    name = refused.group(1).rstrip(".") if refused else None
    if _python2_strings(path) or (name and name.split(".")[0] in _PY2_MODULES):
        reason = ("Python 2 strings in its pickle" if not name else
                  "it pickles the Python 2 global %s" % name)
        return errors.error("ckpt_py2", path, reason=reason, name=os.path.basename(path))
    if name:
        return errors.error("ckpt_refused", path, name=name)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    size = os.path.getsize(path)
    if size == 0:
        return errors.error("ckpt_truncated", path, reason="empty file")
    if (head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path)) or \
            head == _LEGACY_MAGIC:
        return errors.error("ckpt_truncated", path,
                            reason="%d bytes; %s" % (size, _load_reason(exc)))
    return errors.error("ckpt_not_torch", path, reason=_load_reason(exc))


def check_checkpoint_structure(ckpt, path):
    """The originals' format, common to every matcher: a dict with 'model' = a list of state
    dicts (e.g. [img_enc, txt_enc, sim_enc]) and 'opt' = an argparse.Namespace. Which matcher
    it is, is for the registry to say (matchers.recognise)."""
    if not isinstance(ckpt, dict):
        raise errors.error("ckpt_not_model", path, reason="it holds a %s" % type(ckpt).__name__)
    if "model" not in ckpt or "opt" not in ckpt:
        keys = ", ".join(sorted(map(str, ckpt))[:5]) or "none"
        raise errors.error("ckpt_not_model", path, reason="no 'model'/'opt' entries; its keys: %s"
                           % keys)
    model = ckpt["model"]
    if not (isinstance(model, (list, tuple)) and len(model) >= 1 and
            all(isinstance(sd, dict) for sd in model)):
        raise errors.error("ckpt_not_model", path,
                           reason="'model' is not a list of state dicts ([img_enc, txt_enc, ...])")
    if not isinstance(ckpt["opt"], argparse.Namespace):
        raise errors.error("ckpt_not_model", path, reason="'opt' is a %s, not the options"
                           % type(ckpt["opt"]).__name__)
    if any(isinstance(v, bytes) for v in vars(ckpt["opt"]).values()):
        raise errors.error("ckpt_py2", path, reason="its options hold byte strings",
                           name=os.path.basename(path))


def state_shape(sd, key, axis):
    """Size `axis` of state dict entry `key`, or None (for the matchers' `infer_flags`)."""
    return tuple(sd[key].shape)[axis] if key in sd and sd[key].dim() > axis else None



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
                             % (errors.flag_text(k, want[k]), errors.flag_text(k, have[k]))
                             for k in differ)
            raise errors.error("ckpt_mismatch", path, diff=diff,
                               flags=" ".join(errors.flag_text(k, want[k]) for k in differ))
        return
    differ = [k for k in want if want[k] is not None and want[k] != have.get(k)]
    if differ == ["vocab_size"] and not (count or missing or unexpected):
        raise errors.error("vocab_size", vocab_file, n_vocab=have["vocab_size"],
                           checkpoint=os.path.basename(path),
                           n_ckpt=want["vocab_size"])
    parts = ["%s in the checkpoint, %s from the flags"
             % (errors.flag_text(k, want[k]), errors.flag_text(k, have[k]))
             for k in differ if k != "vocab_size" and have.get(k) is not None]
    if "vocab_size" in differ:
        parts.append("a vocabulary of %d words, %s has %s" % (want["vocab_size"], vocab_file,
                                                              have.get("vocab_size")))
    if count:
        parts.append(count)
    flags = [errors.flag_text(k, want[k]) for k in differ if k != "vocab_size"]
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
        raise errors.error("ckpt_foreign", path, diff="; ".join(parts), model=model.opt.module_name)
    raise errors.error("ckpt_mismatch", path, diff="; ".join(parts), flags=" ".join(flags))


def convert_py2_checkpoint(src, dst, overwrite=False):
    """Re-save a checkpoint of the original python2.7 branch for Python 3, still loading it
    with weights_only (nothing in it is run). Its byte strings are read as UTF-8 where they
    are, else as Latin-1. Never writes over an existing file unless `overwrite`; the
    directory of `dst` is created."""
    errors.check_not_dir(src, src, expected="the checkpoint file to convert")
    if not os.path.isfile(src):
        raise errors.error("ckpt_missing", src)
    outputs.check_output_file(dst, overwrite=overwrite,
                              expected="the file to write (NEW.pth.tar)")
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
    outputs.atomic_save(ckpt, dst)
