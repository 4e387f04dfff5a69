"""Reading and writing checkpoints in the original SGRAF format.

`{'epoch', 'model': [img_enc, txt_enc, sim_enc state dicts], 'best_rsum', 'opt': Namespace,
'Eiters'}` plus, in ours, `'optimizer'` (the Adam state) for resuming.

Loading never executes pickled code: `torch.load(weights_only=True)` with only
`argparse.Namespace` allowed besides tensors and plain containers. Saving writes a partial
file in the same directory and renames it over the target (outputs.atomic_output), so a crash
during a save never leaves a truncated checkpoint behind, and a killed run's partial file is
removed by the next save there. Each checkpoint is recorded as its command's (outputs.made_record).
"""
import os
import shutil

import torch

import checks
import outputs
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
