"""torchrun support shared by train.py and evaluation.py: who this process is, its device, the
process group (nccl on CUDA, gloo on CPU) and its teardown; and the check of a --device.

As nanoGPT, a torchrun launch is recognised from RANK, LOCAL_RANK and WORLD_SIZE in the
environment; a plain `python train.py` / `python evaluation.py` is rank 0 of 1 and starts no
process group. Multi-node launches work the same way (torchrun's rendezvous sets the variables).
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist

import errors

# the other processes wait at a collective while rank 0 validates (training) or writes the
# matrix (evaluation): COCO's dev split may take longer than the default timeout (10 minutes
# with nccl)
TIMEOUT = datetime.timedelta(hours=2)


def env():
    """(ddp, rank, local_rank, world_size): a torchrun launch sets RANK, LOCAL_RANK and
    WORLD_SIZE; a plain run is rank 0 of 1."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    return (True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
            int(os.environ["WORLD_SIZE"]))


def check_device(device, where="--device"):
    """A device that torch knows and this machine has (None: the command's default)."""
    if device is None:
        return
    flag = "%s %s" % (where, device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise errors.error("device", flag, reason=errors.first_line(e)) from None
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ", ".join(["cpu"] + (["cuda"] if n_cuda else []) +
                          ["cuda:%d" % i for i in range(n_cuda)])
    if dev.type == "cuda":
        if n_cuda == 0:
            raise errors.error("device_unavailable", flag, available=available,
                        reason="CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n_cuda:
            raise errors.error("device_unavailable", flag, available=available,
                        reason="this machine has %d CUDA device(s)" % n_cuda)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise errors.error("device_unavailable", flag, available=available,
                        reason="MPS is not available on this machine")
    elif dev.type != "cpu":
        raise errors.error("device_unavailable", flag, available=available,
                    reason="this code runs on cpu and cuda devices")


def local_device(device, local_rank):
    """The device of this process: CUDA means its own GPU, cuda:LOCAL_RANK (selected as the
    current device, as nccl needs)."""
    if torch.device(device).type == "cuda":
        device = "cuda:%d" % local_rank
        torch.cuda.set_device(device)
    return device


def init(device):
    """Join the process group of a torchrun launch: nccl on CUDA, gloo on CPU.

    torch.distributed.nn.functional is imported first, on purpose. Its ten collectives take
    `group=group.WORLD` as a default argument, evaluated when the module is first imported;
    DistributedDataParallel imports it on its first construction, i.e. after this call, so
    the live default group would be bound into those functions' defaults for the life of the
    interpreter. Then destroy_process_group cannot free the gloo backend: its threads
    (gloo_tcp_loop, pt_gloo_runloop) outlive main() and the backend is destroyed only during
    interpreter shutdown, where it sometimes aborts the process ("terminate called without
    an active exception", rank 1 after a finished training: the flaky DDP test). Imported
    before the group exists, the defaults are None (the world group at call time) and
    finish() really frees the backend."""
    import torch.distributed.nn.functional  # noqa: F401  (see above: before the group exists)
    dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo",
                            timeout=TIMEOUT)


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast(obj):
    """Rank 0's `obj` on every process (itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """Every process's `obj`, as a list in rank order, on rank 0; None on the others."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(fn, master_only=False):
    """Run `fn()` on every process (with `master_only`, on rank 0 alone, its result then given
    to every process) and agree on the outcome: when it raised a one-line error
    (errors.SGRAFError) anywhere, every process raises it (the lowest rank's), marked `shared`
    so that rank 0 alone prints it; no process is left waiting at a later collective. Without
    a process group: `fn()`."""
    if not dist.is_initialized():
        return fn()
    result, mine = None, None
    if not master_only or dist.get_rank() == 0:
        try:
            result = fn()
        except errors.SGRAFError as e:
            mine = e
    failure = None if mine is None else (type(mine), str(mine), mine.key)
    if master_only:
        failure, result = broadcast((failure, result))
    else:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        failure = next((f for f in failures if f is not None), None)
    if failure is not None:
        cls, message, key = failure
        err = mine if mine is not None and str(mine) == message else cls(message, key=key)
        err.shared = True
        raise err
    return result


def abandon():
    """Destroy the process group without waiting for the others (after an error that every
    process raised, or when torchrun is stopping them)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(*owners):
    """Leave the process group: wait for every process, release what still uses the group, then
    destroy it, so that the backend and its threads are gone before main() returns (see
    init()).

    The order matters. A DistributedDataParallel wrapper keeps its own reference to the group
    (its reducer's), so `destroy_process_group` alone does not free the backend while a
    wrapper is alive: it would be freed at interpreter exit, when the garbage collector
    reaches the wrapper. So the callers' `owners` (objects with a `release_ddp()` method, or
    None) drop their wrappers first, the collector frees them now, and only then is the group
    destroyed, after a barrier so that no process is still talking to one that left."""
    if not dist.is_initialized():
        return
    dist.barrier()
    for owner in owners:
        if owner is not None:
            owner.release_ddp()
    gc.collect()
    dist.destroy_process_group()
