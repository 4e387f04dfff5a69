"""A training run's directory: its checkpoints and logs, and what to say when a run diverges.

Where train.py writes is checked before any compute (`check_run`): never over another run's
checkpoints (`--model_name`) or TensorBoard logs (`--logger_name`) unless `--overwrite`; a
resumed run goes on in its own directory, but neither over the checkpoints of later epochs nor
with nothing left to train. The files of a run that `--overwrite` replaces are removed at the
new run's first checkpoint (`remove_files`), so that no file of the earlier run stays beside
its own. One run at a time holds the two directories (`lock_run`), and the logs of a run of
the same --model_name that was stopped before its first checkpoint are its own, started over.
Before the first epoch the disk must hold two checkpoints (`check_disk`); a checkpoint that
cannot be written is one line saying what was kept (`save_failed`).

A run that diverges stops before the optimizer step that would apply a NaN/Inf
(`stop_on_nonfinite`), so nothing non-finite is saved, and the error says why when the batch
shows it (`explain_divergence`: an image with NaN/Inf or an all-zero region, by its index in
the feature file) or else what to do.
"""
import math
import os
import re

import torch

import checkpoint
import errors
import outputs


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
            raise errors.error("resume_done", errors.opt_where(opt, "num_epochs"), path=opt.resume,
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
        raise errors.error("run_exists", model_name, found=" and ".join(names),
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
        raise errors.error("run_later", "--model_name %s" % model_name, found=found,
                           resumed=os.path.basename(resume), epochs=resumed_epochs,
                           latest=later[-1])
    # model_best.pth.tar may be of a later epoch too: then it goes with them
    if os.path.isfile(best) and not _same_path(best, resume) and \
            _epochs_of(best) not in range(resumed_epochs + 1):
        later.append(best)
    return later


def _epochs_of(path):
    """The epoch count saved in a checkpoint, or None when it cannot be read."""
    try:
        with torch.serialization.safe_globals(checkpoint.SAFE_GLOBALS):
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
    record = outputs.made_record(logger_name) or {}
    owner = record.get("model_name") if record.get("made_by") == "train.py" else None
    if resume and (owner is None or _same_path(owner, model_name)):
        return []
    if owner is not None and _same_path(owner, model_name):
        # the logs of this --model_name's own run, which has no checkpoint (check_run_dir
        # refuses one that has): it was stopped before its first one, and this run, which
        # holds the directory now (lock_run), starts it over
        return events
    if overwrite:
        return events
    owner = _shown(owner) if owner else None
    raise errors.error("log_exists", "--logger_name %s" % logger_name,
                       owner="the run in %s" % owner if owner else "another run")


def lock_run(opt):
    """Hold `--model_name` and `--logger_name` for this run (outputs.lock_dir): a second run
    into either is refused (`run_busy`) while this one lives. Returns the locks."""
    locks = []
    try:
        for flag in ("model_name", "logger_name"):
            path = getattr(opt, flag)
            if any(_same_path(lock.directory, path) for lock in locks):
                continue  # one lock per directory: a second one would release the first
            locks.append(outputs.lock_dir(path, errors.opt_where(opt, flag), "--" + flag))
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise
    return locks


def checkpoint_bytes(model):
    """About the size of a checkpoint of `model`: its weights and its optimizer's state (two
    tensors per parameter for Adam before the first step has made them), each tensor with the
    few hundred bytes of its record in torch.save's zip, plus the generators' states."""
    def nbytes(x):  # a state dict, or the list of them of the original format
        if torch.is_tensor(x):
            return x.numel() * x.element_size() + TENSOR_OVERHEAD
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        return sum(nbytes(v) for v in x) if isinstance(x, (list, tuple)) else 0
    params = [p for g in model.optimizer.param_groups for p in g["params"]]
    state = [model.optimizer.state[p] for p in params if p in model.optimizer.state]
    return nbytes(model.state_dict()) + (nbytes(state) if state else 2 * nbytes(params)) + \
        RNG_BYTES


# what torch.save adds per tensor (zip headers, 64-byte alignment, its name), and the
# random generators' states that train.py saves (torch's and numpy's, about 5 KB each)
TENSOR_OVERHEAD, RNG_BYTES = 256, 12 << 10


def check_disk(model_name, size):
    """Before the first epoch: the disk of `--model_name` holds two checkpoints of `size`
    bytes (checkpoint_N.pth.tar and model_best.pth.tar), or the run is refused now rather than
    at its first save."""
    outputs.check_space(os.path.join(model_name, BEST), 2 * size,
                        "two checkpoints of %s" % outputs.human(size), "--model_name",
                        where="--model_name %s" % model_name)


def save_failed(exc, last, best_epoch):
    """The error of a checkpoint that could not be written (`exc`: outputs.write_failed):
    what the run kept (its latest checkpoint `last`, model_best.pth.tar of `best_epoch`) and
    how to go on from it."""
    path, reason = exc.where, exc.fields["reason"]
    kept = ["%s is intact" % os.path.basename(last)] if last else []
    if best_epoch is not None:
        kept.append("%s of epoch %d is intact" % (BEST, best_epoch))
    elif os.path.basename(path) == BEST and os.path.isfile(path):
        kept.append("the earlier %s is intact" % BEST)
    kept = " and ".join(kept) or "no checkpoint of this run was saved"
    then = ("continue with --resume %s" % last if last else "run the same command again")
    fix = ("free some space, then %s" % then if "space" in reason or "quota" in reason else
           "make --model_name writable, then %s" % then)
    return outputs.write_failed(path, reason, kept=kept, fix=fix)


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



# ----------------------------------------------------------------------------- divergence

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
            raise errors.error("diverged_start", model.opt.model_name, what=what,
                               iteration=model.Eiters)
    return model.optimizer.register_step_pre_hook(hook)


def check_loss(loss, iteration, where):
    """A non-finite loss returned by a train step (for a step that was not stopped before)."""
    value = float(loss)
    if not math.isfinite(value):
        raise errors.error("diverged_start", where, what="loss is %s" % value, iteration=iteration)


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
        return errors.error("diverged_nonfinite" if kind == "nonfinite" else "diverged_zero_region",
                            features, image=image, region=region, what=what, iteration=iteration)
    if last:
        return errors.error("diverged", exc.where, what=what, iteration=iteration, last=last)
    return errors.error("diverged_start", exc.where, what=what, iteration=iteration)
