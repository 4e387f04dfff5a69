"""Train any matcher of the registry (matchers.py), as the originals' `train.py`.

    python train.py --data_name f30k_precomp --num_epochs 40 --lr_update 30 --module_name <name>
    torchrun --standalone --nproc_per_node=4 train.py --data_name coco_precomp ...
(README: each matcher's published commands.)

The matcher owns its optimizer (Adam for the SCAN family), its learning-rate schedule (x0.1 every
`lr_update` epochs, set at the start of each epoch, each parameter group from its own base
rate), its loss and its train step; gradient norm clipped at `grad_clip`. R@K on dev after every
epoch and every `val_step` iterations; `checkpoint_{epoch}.pth.tar` and `model_best.pth.tar` (by
dev rsum) under `--model_name` in the original format, plus the optimizer and RNG state so that
`--resume` continues exactly where the run stopped. TensorBoard scalars under `--logger_name`.

Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment, as nanoGPT) every process
trains on its shard of the training set (DistributedSampler, reshuffled every epoch from
`--seed`) with batches of `--batch_size` pairs, scores and takes the loss of its own batch as
the original DAA does, and DDP averages the gradients over the processes (nccl on CUDA, gloo on
CPU); the learning rate is multiplied by the world size unless `--no-scale_lr`. Rank 0 (the
master process) alone validates, logs, writes TensorBoard and checkpoints while the others wait
for it. `--world_size` is only checked against the launcher; it never starts processes.

`--precision bf16` trains under bf16 autocast (CPU or CUDA, opt-in; fp32 the default, the
originals' arithmetic): one context chosen once (contract.Matcher.train_emb), with the loss, the
weights, their gradients and Adam's state in fp32, and what each matcher declares in its
`fp32_parts` (docs/training.md). The checkpoint's `opt` records it; `--resume` keeps it unless
`--precision` is given.

A matcher may refuse flags or torchrun (its class's `check_opt`, before any compute), and save
state of its own beside the weights (`checkpoint_extra`, restored by `resume`).
"""
import logging
import os
import random
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

import daa
import data
import distributed
import errors
import matchers
import opts
import outputs
import runs
from checkpoint import load_checkpoint, save_checkpoint
from evaluation import encode_data, report
from meters import AverageMeter

log = logging.getLogger("train")


def check_world_size(opt, world_size, ddp):
    """`--world_size` (the DAA commands') must agree with the launcher, which alone starts the
    processes."""
    if opt.world_size is None or opt.world_size == world_size:
        return
    where = "--world_size %d" % opt.world_size
    if ddp:
        raise errors.error("world_size", where, n=world_size, want=opt.world_size)
    raise errors.error("world_size_plain", where, want=opt.world_size)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """The random generators' states, as tensors and ints (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": random.getstate()[1],
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def validate(opt, val_loader, model, writer=None):
    """R@K on the validation split, and DAA's ASP (logged, not used for model selection);
    returns the sum of the six recalls."""
    img_embs, cap_embs, cap_lens = enc = encode_data(model, val_loader,
                                                     img_stride=val_loader.dataset.im_div)
    start = time.time()
    sims = model.score(img_embs, cap_embs, cap_lens, **enc.extra)
    log.info("calculate similarity time: %.2f", time.time() - start)
    # DAA's ASP metric, with the semantics of the split's own captions (TF-IDF fitted once)
    dset = val_loader.dataset
    if getattr(dset, "tfidf", None) is None:
        dset.tfidf = daa.caption_tfidf(dset.captions[:len(dset)])
    res = report(sims, tfidf=dset.tfidf, log=log.info)
    (r1, r5, r10, medr, meanr), (r1i, r5i, r10i, medri, meanri) = res["i2t"], res["t2i"]
    scalars = [("r1", r1), ("r5", r5), ("r10", r10), ("medr", medr), ("meanr", meanr),
               ("r1i", r1i), ("r5i", r5i), ("r10i", r10i), ("medri", medri),
               ("meanri", meanri), ("r_sum", res["rsum"]),
               ("asp_i2t", res["asp"][0]), ("asp_t2i", res["asp"][1])]
    if writer is not None:
        for k, v in scalars:
            writer.add_scalar(k, v, global_step=model.Eiters)
    return res["rsum"]


def validate_on_master(opt, val_loader, model, writer=None):
    """validate() on rank 0 with the bare encoders (no collective call inside), while the other
    processes wait at the broadcast of its result; every process returns rank 0's rsum."""
    r_sum = validate(opt, val_loader, model, writer) if distributed.is_master() else 0.0
    return distributed.broadcast(r_sum)


def train_epoch(opt, train_loader, model, epoch, val_loader, writer=None):
    batch_time, data_time = AverageMeter(), AverageMeter()
    end = time.time()
    for i, batch in enumerate(train_loader):
        model.train_start()
        data_time.update(time.time() - end, 1)
        try:
            runs.check_loss(model.train_emb(*batch, **batch.extra), model.Eiters,
                            opt.model_name)
        except errors.DivergedError as e:
            e.batch = batch  # for main to say what in it made the run diverge
            raise
        batch_time.update(time.time() - end, 1)
        end = time.time()

        if model.Eiters % opt.log_step == 0:
            log.info("Epoch: [{0}][{1}/{2}]\t{e_log}\t"
                     "Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                     "Data {data_time.val:.3f} ({data_time.avg:.3f})\t".format(
                         epoch, i, len(train_loader), batch_time=batch_time,
                         data_time=data_time, e_log=str(model.logger)))
        if writer is not None:
            writer.add_scalar("epoch", epoch, global_step=model.Eiters)
            writer.add_scalar("step", i, global_step=model.Eiters)
            writer.add_scalar("batch_time", batch_time.val, global_step=model.Eiters)
            writer.add_scalar("data_time", data_time.val, global_step=model.Eiters)
            model.logger.tb_log(writer, step=model.Eiters)

        if model.Eiters % opt.val_step == 0:
            validate_on_master(opt, val_loader, model, writer)


class Run:
    """What main's phases share: the launch (torchrun or one process) and the run's files
    (the checkpoint it resumes, the files of a run it replaces, its latest checkpoint)."""

    def __init__(self):
        self.ddp, self.rank, self.local_rank, self.world_size = distributed.env()
        self.master = self.rank == 0  # logs, validates and saves
        self.ckpt, self.replaced = None, []  # the checkpoint resumed, a replaced run's files
        self.generator = None  # the single process's shuffling, reseeded every epoch
        self.last = None  # the run's latest checkpoint, for the advice of a diverged run
        self.best_epoch = None  # the epochs of model_best.pth.tar, when this run wrote it
        self.locks = []  # its directories, held for the whole run (rank 0)

    def release(self):
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []


def parse_and_check(argv, run=None):
    """The flags, the matcher and the run's files, every check before any compute:
    (opt, matcher class, Run); its directories are locked for the run (Run.release)."""
    opt = opts.parse_opt(argv)
    run = run or Run()
    logging.basicConfig(format="%(asctime)s %(message)s",
                        level=logging.INFO if run.master else logging.WARNING)
    check_world_size(opt, run.world_size, run.ddp)
    matcher = matchers.matcher_class(opt.module_name)
    matcher.check_opt(opt, distributed=run.ddp)  # the matcher's own flags and refusals
    opts.check_train_opt(opt)  # flags, device, paths
    run.ckpt = load_checkpoint(opt.resume) if opt.resume else None
    # one run per directory, from here to the end (rank 0 holds it for all); taken before
    # the checks below, so that of two runs started together one runs and one is refused
    if run.master:
        run.locks = runs.lock_run(opt)
    # never over another run's checkpoints or logs; the files of a run it replaces (with
    # --overwrite) are removed at its first checkpoint
    run.replaced = runs.check_run(opt, run.ckpt)
    run.last = opt.resume or None
    if run.last:
        errors.on_interrupt("nothing new was saved (%s is the latest checkpoint)" % run.last,
                            "continue with the same command")
    else:
        errors.on_interrupt("no checkpoint was saved yet",
                            "run the same command again (it starts over)")
    if opt.seed is None and run.ckpt is not None:  # replay the resumed run's shuffling
        opt.seed = getattr(run.ckpt["opt"], "seed", None)
    if opt.precision is None:  # --resume without --precision: the checkpoint's (fp32 if none)
        opt.precision = getattr(run.ckpt["opt"], "precision", None) or "fp32"
    return opt, matcher, run


def launch(opt, run):
    """Under torchrun, join the process group; seed every process; the learning rate's scale."""
    if run.ddp:
        opt.device = distributed.local_device(opt.device, run.local_rank)
        distributed.init(opt.device)
    if opt.seed is None:  # still seed the shuffling, so that --resume can replay it
        # one seed for all: the DistributedSampler shards one permutation
        opt.seed = distributed.broadcast(random.SystemRandom().randrange(2 ** 31))
    # dropout differs between processes; DDP copies rank 0's initial weights to the others
    seed_everything(opt.seed + run.rank)
    # DAA's convention: learning rate x world size, the batch of each process --batch_size
    opt.lr_scale = run.world_size if run.ddp and opt.scale_lr else 1
    if run.ddp:
        log.info("torchrun: %d processes (%s), learning rate %g x %d, %d pairs a step",
                 run.world_size, dist.get_backend(), opt.learning_rate, opt.lr_scale,
                 run.world_size * opt.batch_size)


def prepare_data(opt, matcher, run):
    """The vocabulary and the train and validation loaders, checked against the matcher and
    the flags: (train_loader, val_loader, vocab_file)."""
    vocab, vocab_file = matcher.vocabulary(opt)
    opt.vocab_size = len(vocab)
    # single process: a generator for the shuffling, reseeded every epoch, so that a resumed run
    # sees the same batches as an uninterrupted one; torchrun: each process's shard of one
    # permutation per epoch (set_epoch), from the same seed
    run.generator = None if run.ddp else torch.Generator()
    sampler = (partial(DistributedSampler, num_replicas=run.world_size, rank=run.rank,
                       shuffle=True, seed=opt.seed) if run.ddp else None)
    train_loader, val_loader = data.get_loaders(opt.data_name, vocab, opt.batch_size,
                                                opt.workers, opt, train_sampler=sampler,
                                                generator=run.generator, matcher=matcher)
    # the captions of one process's epoch (the DistributedSampler pads the split to a multiple
    # of the world size), e.g. against a last batch of 1 for BatchNorm
    matcher.check_train_data(len(train_loader.sampler) if run.ddp else
                             len(train_loader.dataset), opt.batch_size)
    dset = val_loader.dataset  # validation reports R@K: five captions per image
    if hasattr(dset, "im_div"):
        data.check_eval_captions(len(dset) // dset.im_div, len(dset),
                                 getattr(dset, "cap_path", "the validation split"))
    dset = train_loader.dataset
    if run.ckpt is None:  # a resumed model's biases moved: an all-zero region no longer stops it
        data.warn_zero_regions(getattr(dset, "images", None), train_features(dset))
    return train_loader, val_loader, vocab_file


def train_features(dset):
    """The training features as a message names them: their file, when the dataset has one."""
    return getattr(dset, "feat_path", "the training features")


def build_model(opt, matcher, run, train_set, vocab_file):
    """The matcher, new or resumed (weights, optimizer, iteration, generators), wrapped for DDP
    under torchrun: (model, start_epoch, best_rsum)."""
    # resumed: the checkpoint's weights replace any pretrained ones the flags name
    model = matcher(opt) if run.ckpt is None else matcher.for_checkpoint(opt)
    model.set_semantics(train_set.captions[:len(train_set)])  # DAA's TF-IDF (with --daa_weight)
    runs.stop_on_nonfinite(model)  # a NaN loss stops the run before the step, unsaved
    start_epoch, best_rsum = 0, 0
    if run.ckpt is not None:
        start_epoch, best_rsum = resume(opt, model, run, vocab_file)
    if run.ddp:  # after loading: the wrappers start from the same weights on every process
        model.ddp([run.local_rank] if model.device.type == "cuda" else None)
    return model, start_epoch, best_rsum


def resume(opt, model, run, vocab_file):
    """The checkpoint's state into the model and this process's generators:
    (start_epoch, best_rsum)."""
    ckpt = run.ckpt
    matchers.check_fits(model, ckpt, opt.resume, vocab_file)
    model.resume(ckpt)  # weights, optimizer, iteration, the matcher's own state
    start_epoch, best_rsum = ckpt["epoch"], ckpt["best_rsum"]
    # every process's generators when the checkpoint was written by as many processes
    rngs = ckpt.get("rng_ranks", [ckpt["rng"]] if "rng" in ckpt else None)
    if rngs is not None and len(rngs) == run.world_size:
        set_rng_state(rngs[run.rank])
    log.info("=> resumed from %s (epoch %d, best_rsum %.1f)", opt.resume, start_epoch,
             best_rsum)
    return start_epoch, best_rsum


def open_logs(opt, model, run):
    """On rank 0: the run's directories and its TensorBoard writer (None elsewhere)."""
    if not run.master:
        return None
    os.makedirs(opt.model_name, exist_ok=True)
    os.makedirs(opt.logger_name, exist_ok=True)
    for lock in run.locks:  # the run starts: its directories stay, its files appear
        lock.keep()
    # the log directory belongs to this run: a run in another --model_name is refused there
    outputs.mark_made(opt.logger_name, "train.py", model_name=os.path.abspath(opt.model_name))
    from torch.utils.tensorboard import SummaryWriter
    # a resumed run drops the logged steps after its checkpoint's (a killed run's last ones)
    return SummaryWriter(opt.logger_name, flush_secs=5,
                         purge_step=model.Eiters if run.ckpt is not None else None)


def train_loop(opt, model, run, train_loader, val_loader, writer, start_epoch, best_rsum):
    """Every epoch: its learning rates and shuffling, its steps, R@K on dev, a checkpoint;
    returns the best dev rsum."""
    for epoch in range(start_epoch, opt.num_epochs):
        log.info("%s\n%s", opt.logger_name, opt.model_name)
        model.start_epoch(epoch, lr_scale=opt.lr_scale)  # learning rates, the matcher's hooks
        if run.ddp:
            train_loader.sampler.set_epoch(epoch)
        else:
            run.generator.manual_seed(opt.seed * 1000003 + epoch)
        try:
            train_epoch(opt, train_loader, model, epoch, val_loader, writer)
        except errors.DivergedError as e:
            raise diverged(e, run, train_loader.dataset) from None
        r_sum = validate_on_master(opt, val_loader, model, writer)
        is_best = r_sum > best_rsum
        best_rsum = max(r_sum, best_rsum)
        save_epoch(opt, model, run, epoch, best_rsum, is_best)
    return best_rsum


def diverged(e, run, dset):
    """The error of a diverged run, saying what in the batch's images explains it, if
    anything: the images as the file holds them (a matcher's collate may pad or drop
    regions)."""
    batch, images, image_ids = getattr(e, "batch", None), None, None
    if batch is not None and getattr(dset, "images", None) is not None:
        image_ids = sorted({int(i) // getattr(dset, "im_div", 1) for i in batch.ids})
        images = np.stack([np.asarray(dset.images[j], dtype=np.float32) for j in image_ids])
    return runs.explain_divergence(e, run.last, images=images, image_ids=image_ids,
                                     features=train_features(dset))


def save_epoch(opt, model, run, epoch, best_rsum, is_best):
    """`checkpoint_{epoch}.pth.tar` (and `model_best.pth.tar`) on rank 0, with every process's
    generators; the files of a run this one replaces go once it has its own."""
    state = {
        "epoch": epoch + 1,
        "model": model.state_dict(),
        "best_rsum": best_rsum,
        "opt": opt,
        "Eiters": model.Eiters,
        "optimizer": model.optimizer.state_dict(),
        "rng": rng_state(),
        **model.checkpoint_extra(),
    }
    if run.ddp:  # every process's generators, for an exact --resume with as many processes
        state["rng_ranks"] = [None] * run.world_size
        dist.all_gather_object(state["rng_ranks"], state["rng"])

    def save():
        name = "checkpoint_{}.pth.tar".format(epoch)
        try:
            save_checkpoint(state, is_best, filename=name, prefix=opt.model_name + "/")
        except errors.SGRAFError as e:
            if e.key != "write_failed":
                raise
            # model_best.pth.tar is written after checkpoint_N, which is whole then
            last = (os.path.join(opt.model_name, name) if os.path.basename(e.where) ==
                    runs.BEST else run.last)
            raise runs.save_failed(e, last, run.best_epoch) from None
        run.last = os.path.join(opt.model_name, name)
        run.best_epoch = epoch + 1 if is_best else run.best_epoch
        errors.on_interrupt("%s (epoch %d) is saved" % (run.last, epoch + 1),
                            "continue with the same command and --resume %s" % run.last)
        if run.replaced:  # the replaced run's files go once this run has its own
            runs.remove_files(run.replaced, keep=[run.last] + (
                [os.path.join(opt.model_name, runs.BEST)] if is_best else []))
            run.replaced = []
    # on rank 0, while the others wait for it (and stop with it when it cannot write)
    distributed.agree(save, master_only=True)


def finish(model, writer):
    if writer is not None:
        writer.close()
    distributed.finish(model)  # the backend's threads end here, not at interpreter exit


@errors.exit_on_error
def main(argv=None):
    run = Run()
    try:
        opt, matcher, run = parse_and_check(argv, run)
        launch(opt, run)
        train_loader, val_loader, vocab_file = prepare_data(opt, matcher, run)
        model, start_epoch, best_rsum = build_model(opt, matcher, run, train_loader.dataset,
                                                    vocab_file)
        if run.master:  # before the first epoch: room for checkpoint_N and model_best.pth.tar
            runs.check_disk(opt.model_name, runs.checkpoint_bytes(model))
        writer = open_logs(opt, model, run)
        best_rsum = train_loop(opt, model, run, train_loader, val_loader, writer, start_epoch,
                               best_rsum)
        finish(model, writer)
    finally:
        run.release()
    return best_rsum


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
