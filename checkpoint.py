"""Reading and writing checkpoints in the original SGRAF format.

`{'epoch', 'model': [img_enc, txt_enc, sim_enc state dicts], 'best_rsum', 'opt': Namespace,
'Eiters'}` plus, in ours, `'optimizer'` (the Adam state) for resuming.

Loading never executes pickled code: `torch.load(weights_only=True)` with only
`argparse.Namespace` allowed besides tensors and plain containers. Saving writes a temporary
file in the same directory and renames it over the target, so a crash during a save never
leaves a truncated checkpoint behind.
"""
import os
import shutil
import tempfile

import torch

import checks
from checks import CheckpointError  # noqa: F401  (a checkpoint that cannot be used)
from checks import SAFE_GLOBALS


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise checks.error("ckpt_missing", path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a refused pickled object
        raise checks.explain_load_failure(path, e) from None
    checks.check_checkpoint_structure(ckpt, path)
    return ckpt


def _atomic_copy(src, dst):
    directory = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth.tar", dir=directory)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state, is_best, filename="checkpoint.pth.tar", prefix=""):
    """Write `prefix + filename` and, if `is_best`, `prefix + 'model_best.pth.tar'`, each
    atomically."""
    path = prefix + filename
    checks.atomic_save(state, path)
    if is_best:
        _atomic_copy(path, prefix + "model_best.pth.tar")
