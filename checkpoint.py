"""Reading and writing checkpoints in the original SGRAF format.

`{'epoch', 'model': [img_enc, txt_enc, sim_enc state dicts], 'best_rsum', 'opt': Namespace,
'Eiters'}` plus, in ours, `'optimizer'` (the Adam state) for resuming.

Loading never executes pickled code: `torch.load(weights_only=True)` with only
`argparse.Namespace` allowed besides tensors and plain containers. Saving writes a partial
file in the same directory and renames it over the target (checks.atomic_output), so a crash
during a save never leaves a truncated checkpoint behind, and a killed run's partial file is
removed by the next save there.
"""
import os
import shutil

import torch

import checks
from checks import CheckpointError  # noqa: F401  (a checkpoint that cannot be used)
from checks import SAFE_GLOBALS


def load_checkpoint(path, map_location="cpu"):
    if os.path.isdir(path):
        best = os.path.join(path, "model_best.pth.tar")
        raise checks.error("path_not_file", path, expected="a checkpoint file in it, e.g. %s"
                           % best if os.path.isfile(best) else "a checkpoint file")
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
    with checks.atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_checkpoint(state, is_best, filename="checkpoint.pth.tar", prefix=""):
    """Write `prefix + filename` and, if `is_best`, `prefix + 'model_best.pth.tar'`, each
    atomically."""
    path = prefix + filename
    checks.atomic_save(state, path)
    if is_best:
        _atomic_copy(path, prefix + "model_best.pth.tar")
