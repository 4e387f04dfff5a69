"""Benchmark of the matchers' hot paths (in the spirit of nanoGPT's bench.py).

Times, at full dimensions on random inputs, every matcher of the registry (matchers.py):
encoding, scoring n_img x n_cap pairs and one training step, fast against a per-caption
reference: our reconstruction of the original computation, op for op. Prints pairs/s, the
effective GFLOP/s (FLOPs of the original algorithm for the same pairs / time), the machine's
matmul peak measured in the same run, peak memory, speedups over the reference and the largest
difference from it. The speedups are ratios against the reference, not against the original
code: where the reference was calibrated against the original code measured side by side in
one run (README, Speed), they stand for ratios against the original; a matcher may also time
its original code's evaluation (`Matcher.bench_original_code`). Every measured job runs in its
own subprocess, so the peak memories do not mix.

What each matcher benchmarks comes from the contract (contract.Matcher's bench hooks), so this
file names none:
- a matcher scored pair by pair: `encode` (`forward_emb`); `eval`, its `score` of random
  embeddings (`bench_embeddings`) against `percaption_scores`, the original evaluation's shards
  caption by caption (`bench_ref_shard`); `train`, one `train_emb` against
  `reference_train_step`, the original `train_emb` op for op through `forward_sim_percaption`
  (all B x B pairs, caption by caption, one graph), where it has one; `daa` for the matchers
  that train with DAA (`trains_with_daa`).
- a dual encoder (`dual_encoder`): its evaluation end to end (`bench_eval_steps`: encode
  images, encode captions, score) and its train step, in each of its `bench_variants`, with no
  per-caption reference.
- their own flags (`add_bench_options`), sizes and inputs (`bench_model`, `bench_train_inputs`).

    python bench.py                      # every matcher: 100 images x 500 captions, batch 128
    python bench.py --quick              # small sanity run
    python bench.py --modules NAME --what eval --precision bf16
    python bench.py --what train --precision fp32,bf16 --table   # fp32 vs bf16 steps, a table
    python bench.py --what retrieve --modules NAME,NAME   # one text query, 1000-image gallery
    python bench.py --what two_stage --modules NAME     # shortlist + re-rank: bench_two_stage.py
    python bench.py --help               # the flags, the matchers' own included

`--precision fp32,bf16` runs the eval and train jobs in each precision (the per-caption
reference, fp32, once): bf16 autocast in `score` where the matcher has it, and in the train step
(train.py --precision bf16). `--table` ends with one markdown table of the times (docs/speed.md).

`--what retrieve` times retrieve.py end to end on a gallery written to a temporary directory
(`--gallery` images of random features at `--img_dim`, 5 synthetic captions each, the shipped
Flickr30K vocabulary, a randomly initialised checkpoint at full dimensions, and the files it
needs beside it: `bench_gallery_files`): one text query uncached (load, hash the files, encode
the split, cache it, score), then cached (load, read the cache, score), then a query on the
gallery already loaded (`Gallery.search_text`: the query's own cost), and the cached query as a
command (`python retrieve.py ...`, imports included).

`--what two_stage` (bench_two_stage.py) times two-stage retrieval for each cross-attention
matcher of --modules, re-ranking the shortlist of the registry's matcher that embeds alone:
evaluation times extrapolated from measured rates, and text queries against a large synthetic
gallery stored memory-mapped.
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import bench_two_stage
import distributed
import errors
from contract import random_batch, random_lengths


def registry():
    """matchers.py, imported when first needed: after a job has taken its start memory, which
    the matchers' modules would otherwise count in (as when each job imported its own)."""
    import matchers
    return matchers


def matcher(name):
    """The class of a --modules name (the registry's --module_name)."""
    return registry().matcher_class(name)


def build_parser():
    p = errors.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--n_img", type=int, default=100)
    p.add_argument("--n_cap", type=int, default=500)
    p.add_argument("--min_len", type=int, default=8)
    p.add_argument("--max_len", type=int, default=20)
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--img_dim", type=int, default=2048)
    p.add_argument("--embed_size", type=int, default=1024)
    p.add_argument("--sim_dim", type=int, default=256)
    p.add_argument("--word_dim", type=int, default=300)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated fp32, bf16: the fast path's precision in the eval and "
                        "train jobs (bf16: autocast), each in turn")
    p.add_argument("--table", action="store_true",
                   help="end with one markdown table of the eval and train times")
    p.add_argument("--daa_weight", type=float, default=0.0,
                   help="train jobs of the matchers that train with DAA at this weight ('--what "
                        "daa' times the step with --daa_weight, default 10, against without)")
    p.add_argument("--steps", type=int, default=2,
                   help="training steps timed per job after a full-size warm-up step (the "
                        "fastest is reported, at least 2; '--what daa' "
                        "alternates at least 3 of each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modules", default=",".join(registry().MATCHERS),
                   help="comma-separated: " + ", ".join(registry().MATCHERS))
    p.add_argument("--what", default="encode,eval,train",
                   help="comma-separated: " + ", ".join(WHATS))
    p.add_argument("--no_ref", action="store_true", help="skip the per-caption reference")
    p.add_argument("--gallery", type=int, default=1000,
                   help="'--what retrieve': images of the gallery (5 captions each)")
    p.add_argument("--quick", action="store_true", help="small sizes, a sanity run")
    p.add_argument("--seed", type=int, default=0)
    bench_two_stage.add_options(p)
    for cls in registry().classes():
        cls.add_bench_options(p.add_argument_group(
            "%s (%s)" % (", ".join(registry().names_of(cls)), cls.__module__ + ".py")))
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    # every mistake before the first (minutes-long) job
    errors.check_positive(args, ["n_img", "n_cap", "min_len", "max_len", "img_dim",
                                 "embed_size", "sim_dim", "word_dim", "threads", "steps"])
    errors.check_nonnegative(args, ["seed", "daa_weight"])
    errors.check_min(args, "batch", 2, "a batch of one pair has no negative")
    errors.check_min(args, "vocab_size", 5, "ids 0-3 are the special tokens")
    if args.min_len > args.max_len:
        raise errors.error("flag_order", errors.opt_where(args, "min_len"),
                           other="--max_len %d" % args.max_len, limit=args.max_len)
    errors.check_choices(args, "modules", tuple(registry().MATCHERS))
    errors.check_choices(args, "what", WHATS)
    errors.check_choices(args, "precision", PRECISIONS)
    bench_two_stage.check_args(args)
    for cls in registry().classes():
        cls.check_bench_args(args)  # their own flags; --quick's sizes for them
    distributed.check_device(args.device)
    if args.quick:
        args.n_img, args.n_cap, args.batch = 10, 50, 16
        args.img_dim, args.embed_size, args.sim_dim, args.word_dim = 256, 128, 64, 50
        args.gallery = 50
    return args


# ----------------------------------------------------------------------------- FLOPs

def original_flops(name, n_img, lens, R=36, d=1024, s=256, shard=100, intra=True):
    """FLOPs (2 x multiply-adds, matmuls only) of matcher `name`'s original per-caption
    algorithm for n_img images against captions of the given lengths, scored in shards of
    `shard` (the matcher's `original_flops`; intra=False: its training score)."""
    return matcher(name).original_flops(name, n_img, lens, R=R, d=d, s=s, shard=shard,
                                        intra=intra)


def matmul_peak(dtype, device, n=2048, reps=6):
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_mem_mb(device):
    """Peak memory of this process: CUDA's max allocated, else the RSS high-water mark
    (VmHWM, which starts afresh at exec; getrusage's maxrss is inherited from the parent)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# ----------------------------------------------------------------------------- setup

def make_model(args, name, variant=None):
    """(model, opt): the matcher `name` at the benchmark's sizes, random weights from
    --seed (Matcher.bench_model)."""
    torch.manual_seed(args.seed)
    return matcher(name).bench_model(args, name, variant)


def eval_lengths(args, rng):
    """The eval job's caption lengths, drawn first: the same for every matcher."""
    return rng.integers(args.min_len, args.max_len + 1, size=args.n_cap)


def make_embeddings(args, rng, name):
    """(img, cap, lens, extra): the eval job's random embeddings (Matcher.bench_embeddings)."""
    return matcher(name).bench_embeddings(args, rng, eval_lengths(args, rng))


def warm_slice(cls, extra, n_img, n_cap):
    """The score inputs of the first n_img images and n_cap captions (score_inputs)."""
    return {k: v[:n_img] if cls.score_inputs.get(k) == "image" else v[:n_cap]
            for k, v in extra.items()}


def daa_semantics(model, args, rng):
    """DAA's semantics for a batch whose item k is caption k of a synthetic split of
    batch x 5 captions (random words over a 500-word vocabulary): sets the model's TF-IDF and
    returns the batch's caption ids."""
    words = ["w%d" % i for i in range(500)]
    caps = [" ".join(rng.choice(words, size=rng.integers(8, 20))) for _ in range(5 * args.batch)]
    model.set_semantics(caps)
    return list(range(args.batch))


def set_dropout(model, on):
    for m in model.modules():
        for x in m.modules():
            if isinstance(x, torch.nn.Dropout):
                x.train(on)


# ----------------------------------------------------------------------------- jobs

def job_encode(args, name, ref):
    model, opt = make_model(args, name)
    model.val_start()
    rng = np.random.default_rng(args.seed)
    images = torch.from_numpy(rng.standard_normal((args.n_img, 36, args.img_dim))
                              .astype(np.float32))
    lens = random_lengths(args, args.n_cap, rng)
    captions = torch.randint(4, args.vocab_size, (args.n_cap, int(lens.max())))
    with torch.no_grad():
        model.forward_emb(images[:2], captions[:2], lens[:2].tolist())
        t = time.perf_counter()
        model.forward_emb(images, captions, lens.tolist())
        sync(args.device)
    return {"time": time.perf_counter() - t}


def job_eval(args, name, ref):
    """`score` (ref False) or the original's evaluation, `percaption_scores` (ref True), of
    the same random embeddings."""
    cls = matcher(name)
    model, opt = make_model(args, name)
    model.val_start()
    img, cap, lens, extra = make_embeddings(args, np.random.default_rng(args.seed), name)

    def scores(img, cap, lens, **extra):
        if ref:
            return model.percaption_scores(args, img, cap, lens, **extra)
        return model.score(img, cap, lens, **extra)
    with torch.no_grad():  # warm-up: lazy initialisations of the process
        scores(img[:2], cap[:3], lens[:3], **warm_slice(cls, extra, 2, 3))
    sync(args.device)
    t = time.perf_counter()
    sims = scores(img, cap, lens, **extra)
    sync(args.device)
    elapsed = time.perf_counter() - t
    return {"time": elapsed, "sims": sims}


def job_original(args, name, ref):
    """The ORIGINAL code's evaluation (Matcher.bench_original) on the eval job's pairs, timed;
    then our fast path with the original model's weights, for the difference."""
    cls = matcher(name)
    img, cap, lens, extra = make_embeddings(args, np.random.default_rng(args.seed), name)
    torch.manual_seed(args.seed)
    original = cls.bench_original(args)
    with torch.no_grad():
        original.scores(img[:2], cap[:3], lens[:3], **warm_slice(cls, extra, 2, 3))
        t = time.perf_counter()
        sims = original.scores(img, cap, lens, **extra)
        elapsed = time.perf_counter() - t
    state = original.close()
    ours, _ = make_model(args, name)
    ours.load_state_dict(state)  # strict: the original's names
    fast = ours.score(img, cap, lens, **extra)
    return {"time": elapsed, "sims": sims, "fast_diff": np.abs(fast - sims).max()}


def job_train(args, name, ref):
    """One training step at full size, as the original's `train_emb` runs in a training loop:
    a first full-size step (dropout off, so that the fast and the reference step compute the
    same function: its loss and clipped gradients are returned for the comparison), then
    max(2, --steps) steps with dropout on, the fastest reported. The first step is not timed:
    it also pays the first touch of all the memory the step needs (page faults, about 8 GB
    for the largest original step here), which took 1.2-1.7x a later step on the machine this was
    developed on, and which a training loop pays once."""
    cls = matcher(name)
    if ref and cls.forward_sim_percaption is None:
        raise ValueError("%s has no per-caption reference training step" % name)
    rng = np.random.default_rng(args.seed + 1)
    args.batch = cls.bench_train_batch(args)
    model, opt = make_model(args, name)
    images, captions, lens, ids, extra = model.bench_train_inputs(args, rng)
    model.train_start()
    if cls.trains_with_daa and args.daa_weight > 0:
        ids = daa_semantics(model, args, rng)
    step_fn = model.reference_train_step if ref else model.train_emb

    def train_emb(images, captions, lengths):
        return step_fn(images, captions, lengths, ids, **extra)
    grads = {}
    step = model.optimizer.step

    def spy(*a, **k):  # the clipped gradients of the first step, for the comparison
        if not grads:
            grads.update({i: p.grad.detach().clone() for i, p in enumerate(model.params)
                          if p.grad is not None})
        return step(*a, **k)
    model.optimizer.step = spy
    set_dropout(model, False)
    loss = train_emb(images, captions, lens)
    flat = torch.cat([grads[i].flatten() for i in sorted(grads)]).numpy()
    set_dropout(model, True)
    times = []
    for _ in range(max(2, args.steps)):
        sync(args.device)
        t = time.perf_counter()
        train_emb(images, captions, lens)
        sync(args.device)
        times.append(time.perf_counter() - t)
    return {"time": min(times), "loss": float(loss), "grads": flat}


def job_daa(args, name, ref):
    """The training step with DAA against without, alternating on one model in one process
    (steps of separate processes vary by +-10% on a shared machine): the fastest of
    max(3, --steps) steps each."""
    rng = np.random.default_rng(args.seed + 1)
    images, captions, lens = random_batch(args, args.batch, rng)
    model, opt = make_model(args, name)
    model.train_start()
    ids = daa_semantics(model, args, rng)
    loss_fn = model.daa
    model.train_emb(images, captions, lens, ids)  # warm-up at full size (see job_train)
    times = {"with": [], "without": []}
    for _ in range(max(3, args.steps)):
        for which in times:
            model.daa = loss_fn if which == "with" else None
            sync(args.device)
            t = time.perf_counter()
            model.train_emb(images, captions, lens, ids)
            sync(args.device)
            times[which].append(time.perf_counter() - t)
    return {"with": min(times["with"]), "without": min(times["without"])}


def job_dual_eval(args, name, variant):
    """A dual encoder's evaluation on random inputs (Matcher.bench_eval_steps): each phase
    (encode the images, the captions, score) timed, and the total."""
    model, opt = make_model(args, name, variant)
    model.val_start()
    out, res = {}, {}
    with torch.no_grad():
        n_img, n_cap, steps = model.bench_eval_steps(args, np.random.default_rng(args.seed))
        sync(args.device)
        t0 = time.perf_counter()
        for phase, fn in steps:
            t = time.perf_counter()
            out[phase] = fn(out)
            sync(args.device)
            res[phase] = time.perf_counter() - t
    res.update(time=time.perf_counter() - t0, n_img=n_img, n_cap=n_cap)
    return res


def job_dual_train(args, name, variant):
    """A dual encoder's train_emb at --batch (Matcher.bench_train_inputs), after a warm-up
    step on 8 pairs; the fastest of --steps."""
    model, opt = make_model(args, name, variant)
    images, captions, lens, ids, extra = model.bench_train_inputs(
        args, np.random.default_rng(args.seed + 1))
    model.train_start()
    model.train_emb(images[:8], captions[:8], lens[:8], ids[:8],
                    **{k: v[:8] for k, v in extra.items()})  # warm-up
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t = time.perf_counter()
        loss = model.train_emb(images, captions, lens, ids, **extra)
        sync(args.device)
        times.append(time.perf_counter() - t)
    return {"time": min(times), "loss": float(loss)}


def write_gallery(args, name, root, variant=None):
    """A SCAN-format split `test` of args.gallery images (random non-negative features, the
    synthetic generator's captions), the shipped Flickr30K vocabulary, and a checkpoint of
    `name` at the benchmark's dimensions with the files it needs beside it
    (Matcher.bench_gallery_files): (checkpoint, data_path, vocab_path, captions)."""
    import synthetic
    from vocab import deserialize_vocab
    data_path, vocab_path = os.path.join(root, "data"), os.path.join(root, "vocab")
    split = os.path.join(data_path, "gallery_precomp")
    os.makedirs(split)
    os.makedirs(vocab_path)
    os.makedirs(os.path.join(root, "ckpt"))
    rng = np.random.default_rng(args.seed)
    feats = np.lib.format.open_memmap(os.path.join(split, "test_ims.npy"), mode="w+",
                                      dtype=np.float32, shape=(args.gallery, 36, args.img_dim))
    for i in range(0, args.gallery, 100):
        x = rng.standard_normal((min(100, args.gallery - i), 36, args.img_dim))
        feats[i:i + 100] = np.maximum(x, 0)
    feats.flush()
    del feats
    caps = synthetic.generate_split("test", args.gallery, args.seed, img_dim=8).captions
    with open(os.path.join(split, "test_caps.txt"), "w", encoding="utf-8") as f:
        f.write("".join(c + "\n" for c in caps))
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "vocab", "f30k_precomp_vocab.json"),
                os.path.join(vocab_path, "gallery_precomp_vocab.json"))
    args.vocab_size = len(deserialize_vocab(os.path.join(vocab_path,
                                                         "gallery_precomp_vocab.json")))
    model, opt = make_model(args, name, variant)
    model.bench_gallery_files(opt, root)
    opt = argparse.Namespace(**dict(vars(opt), data_name="gallery_precomp", data_path=data_path,
                                    vocab_path=vocab_path, workers=0, batch_size=128))
    del opt.device
    ckpt = os.path.join(root, "ckpt", "model_best.pth.tar")
    torch.save({"epoch": 0, "model": model.state_dict(), "best_rsum": 0, "opt": opt,
                "Eiters": 0}, ckpt)
    return ckpt, data_path, vocab_path, caps


def job_retrieve(args, name, ref, variant=None):
    import cache as encodings_cache
    import retrieve
    with tempfile.TemporaryDirectory() as root:
        ckpt, data_path, vocab_path, caps = write_gallery(args, name, root, variant)
        # files older than the cache's "changed just now" window, as a user's data are
        time.sleep(getattr(args, "settle", encodings_cache.RACY_NS / 1e9 + 0.5))
        cache = os.path.join(root, "cache")
        kw = dict(data_path=data_path, vocab_path=vocab_path, split="test",
                  device=args.device, cache_dir=cache, topk=10)
        queries = [caps[7], "a man in a red shirt rides a bike on a street",
                   "two dogs play with a ball on the beach"]
        t = time.perf_counter()
        retrieve.retrieve(ckpt, query=queries[0], **kw)
        uncached = time.perf_counter() - t
        t = time.perf_counter()
        hits = retrieve.retrieve(ckpt, query=queries[1], **kw)
        cached = time.perf_counter() - t
        assert hits["cached"]
        g = retrieve.Gallery(ckpt, data_path, "test", vocab_path=vocab_path,
                             device=args.device, cache_dir=cache)
        g.search_text(queries[0])
        times, plain = [], []
        for q in queries:
            t = time.perf_counter()
            g.search_text(q)
            times.append(time.perf_counter() - t)
        for m in g.members:  # without Matcher.gallery_inputs: score computes them per query
            m.enc.gallery = {}
        for q in queries:
            t = time.perf_counter()
            g.search_text(q)
            plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        # (a matcher whose vocabulary does not read --vocab_path is not given it)
        unused = matcher(name).vocab_path_unused
        vocab_flag = [] if unused else ["--vocab_path", vocab_path]
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "retrieve.py"),
                        "--model_path", ckpt, "--data_path", data_path] + vocab_flag +
                       ["--split", "test", "--device", args.device, "--cache_dir", cache,
                        "--query", queries[2]], check=True, capture_output=True)
        command = time.perf_counter() - t
    return {"uncached": uncached, "cached": cached, "query": min(times),
            "query_plain": min(plain), "command": command}


JOBS = {"encode": job_encode, "eval": job_eval, "train": job_train, "daa": job_daa,
        "original": job_original, "retrieve": job_retrieve}
DUAL_JOBS = {"eval": job_dual_eval, "train": job_dual_train,
             "retrieve": lambda args, name, variant: job_retrieve(args, name, False, variant)}
WHATS = ("encode", "eval", "train", "daa", "retrieve", "two_stage")  # "original": spawned by bench_original
PRECISIONS = ("fp32", "bf16")
# the table's columns within a job, and its ratios: the speed-ups over the references, and
# bf16's over fp32
COLUMN_ORDER = ("fp32", "bf16", "per-caption", "ORIGINAL")
RATIOS = [("eval per-caption", "eval fp32"), ("eval ORIGINAL", "eval fp32"),
          ("train per-caption", "train fp32"), ("train fp32", "train bf16")]


def run_job(args, start_mb):
    """One job, in this process (spawned by `spawn`); start_mb: the memory at its start."""
    what, name, path = args.job.split(":")
    torch.set_num_threads(args.threads)
    base = peak_mem_mb(args.device) if torch.device(args.device).type == "cuda" else start_mb
    if what == "two_stage":  # path: its job
        res = bench_two_stage.JOBS[path](args, name)
    elif matcher(name).dual_encoder:  # path: the variant
        res = DUAL_JOBS[what](args, name, path)
    else:
        res = JOBS[what](args, name, path == "ref")
    res["peak_mb"] = peak_mem_mb(args.device)
    res["base_mb"] = base
    np.savez(args.out, **{k: np.asarray(v) for k, v in res.items()})


def spawn(argv, what, name, path):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.npz")
        subprocess.run([sys.executable, __file__] + argv +
                       ["--job", "%s:%s:%s" % (what, name, path), "--out", out], check=True)
        with np.load(out) as f:
            return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- main

@errors.exit_on_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    start_mb = peak_mem_mb("cpu")  # before the registry's imports (a job's start)
    args = get_args(argv)
    if args.job:
        return run_job(args, start_mb)
    torch.set_num_threads(args.threads)
    dev = args.device
    fp32 = matmul_peak(torch.float32, dev)
    bf16 = matmul_peak(torch.bfloat16, dev)
    print("device %s, %d threads, torch %s" % (dev, args.threads, torch.__version__))
    print("matmul peak (2048^3): fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s" % (fp32, bf16))
    print("sizes: %d images x %d captions (lengths %d-%d), batch %d, img_dim %d, d %d, s %d"
          % (args.n_img, args.n_cap, args.min_len, args.max_len, args.batch, args.img_dim,
             args.embed_size, args.sim_dim))
    whats = args.what.split(",")
    precisions = args.precision.split(",")
    results = {}  # row (matcher, variant) -> {column: seconds}
    for name in args.modules.split(","):
        for k, precision in enumerate(precisions):
            # the jobs that do not depend on the precision, and the fp32 references, once
            todo = whats if k == 0 else [w for w in whats if w in ("eval", "train")]
            sub = argv + ["--precision", precision]  # argparse: the last value wins
            args.precision = precision
            if matcher(name).dual_encoder:
                bench_dual(sub, args, todo, name, results)
            else:
                bench_pairwise(sub, args, todo, name, fp32, results, refs=k == 0)
    args.precision = ",".join(precisions)
    if args.table:
        print("\n%s, torch %s: seconds; eval %d images x %d captions, train batch %d "
              "(or a matcher's own bench_train_batch)\n"
              % (device_name(dev), torch.__version__, args.n_img, args.n_cap, args.batch))
        print(markdown_table(results))
    return results


def markdown_table(rows, ratios=RATIOS):
    """rows {(matcher, variant): {column: seconds}} as one markdown table: a row per matcher
    (and variant), the columns grouped by job ("eval fp32", "eval bf16", "eval per-caption",
    ...), then each ratio a / b of `ratios` that some row has."""
    cols = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    groups = list(dict.fromkeys(c.rsplit(" ", 1)[0] for c in cols))
    cols.sort(key=lambda c: (groups.index(c.rsplit(" ", 1)[0]),
                             COLUMN_ORDER.index(c.rsplit(" ", 1)[1])))
    ratios = [(a, b) for a, b in ratios if any(a in r and b in r for r in rows.values())]
    head = (["matcher"] + ["%s (s)" % c for c in cols] +
            ["%s / %s" % (a, b) for a, b in ratios])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, label), r in rows.items():
        cells = [name if label is None else "%s (%s)" % (name, label)]
        cells += ["%.3f" % r[c] if c in r else "" for c in cols]
        cells += ["%.2fx" % (r[a] / r[b]) if a in r and b in r else "" for a, b in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU, %d threads" % torch.get_num_threads()


def bench_pairwise(argv, args, whats, name, fp32, results, refs=True):
    """The jobs of a matcher scored pair by pair, and their lines; their times into
    results[(name, None)]. `refs`: also the references (fp32, once for all precisions)."""
    cls = matcher(name)
    rec = results.setdefault((name, None), {})
    prec = args.precision
    if "encode" in whats:
        r = spawn(argv, "encode", name, "fast")
        print("[%s] encode %d images + %d captions: %.3f s, peak %.0f MB"
              % (name, args.n_img, args.n_cap, r["time"], r["peak_mb"]))
    if "eval" in whats:
        # the lengths are drawn first, the same for every matcher
        lens = eval_lengths(args, np.random.default_rng(args.seed)).tolist()
        ref_shard = cls.bench_ref_shard
        flops = original_flops(name, args.n_img, lens, d=args.embed_size, s=args.sim_dim,
                               shard=ref_shard)
        pairs = args.n_img * args.n_cap
        f = spawn(argv, "eval", name, "fast")
        rec["eval " + prec] = float(f["time"])
        print("[%s] eval fast (%s): %.2f s, %.0f pairs/s, %.1f effective GFLOP/s "
              "(%.0f%% of fp32 peak, original %.0f GFLOP), peak RSS %.0f MB (start %.0f)"
              % (name, cls.bench_precision(args), f["time"], pairs / f["time"],
                 flops / f["time"] / 1e9, 100 * flops / f["time"] / 1e9 / fp32, flops / 1e9,
                 f["peak_mb"], f["base_mb"]))
        if refs and not args.no_ref:
            r = spawn(argv, "eval", name, "ref")
            rec["eval per-caption"] = float(r["time"])
            ref_what = cls.bench_reference_label(args)
            ref_what += ", shards of %d x %d" % (ref_shard, ref_shard)
            print("[%s] eval %s: %.2f s, %.0f pairs/s, %.1f effective GFLOP/s, "
                  "peak RSS %.0f MB (start %.0f)"
                  % (name, ref_what, r["time"], pairs / r["time"], flops / r["time"] / 1e9,
                     r["peak_mb"], r["base_mb"]))
            print("[%s] eval speedup %.2fx, max |fast - per-caption| = %.2e"
                  % (name, r["time"] / f["time"], np.abs(f["sims"] - r["sims"]).max()))
            if args.n_cap == 5 * args.n_img:
                from evaluation import i2t, t2i
                ra = np.array(i2t(None, None, None, r["sims"])[:3] +
                              t2i(None, None, None, r["sims"])[:3])
                fa = np.array(i2t(None, None, None, f["sims"])[:3] +
                              t2i(None, None, None, f["sims"])[:3])
                print("[%s] R@1,5,10 i2t/t2i per-caption %s, fast %s, max |diff| %.2f"
                      % (name, ra.round(1).tolist(), fa.round(1).tolist(),
                         np.abs(ra - fa).max()))
            original = cls.bench_original_code(args)
            if original:
                o = spawn(argv, "original", name, "ref")
                rec["eval ORIGINAL"] = float(o["time"])
                print("[%s] eval ORIGINAL shard_xattn (%s): %.2f s, peak RSS %.0f MB; "
                      "per-caption / original %.3f, fast speedup over the original %.2fx, "
                      "max |fast - original| = %.2e"
                      % (name, original, o["time"], o["peak_mb"], r["time"] / o["time"],
                         o["time"] / f["time"], float(o["fast_diff"])))
    if "daa" in whats and cls.trains_with_daa:
        w = args.daa_weight if args.daa_weight > 0 else 10.0
        r = spawn(argv + ["--daa_weight", str(w)], "daa", name, "fast")  # last one wins
        print("[%s] train step (fastest of %d, alternating on one model) without DAA %.2f s, "
              "with DAA (weight %g) %.2f s: %+.0f%%, peak RSS %.0f MB"
              % (name, max(3, args.steps), r["without"], w, r["with"],
                 100 * (r["with"] / r["without"] - 1), r["peak_mb"]))
    if "retrieve" in whats:
        print_retrieve("[%s]" % name, args, spawn(argv, "retrieve", name, "fast"))
    if "two_stage" in whats:
        bench_two_stage.run(argv, args, name, spawn)
    if "train" in whats:
        batch = cls.bench_train_batch(args)
        lens = random_lengths(args, batch, np.random.default_rng(args.seed + 1))
        # the per-caption step scores all B x B pairs forward (backward ~2x more)
        flops = original_flops(name, batch, lens, d=args.embed_size, s=args.sim_dim,
                               intra=False)
        f = spawn(argv, "train", name, "fast")
        rec["train " + prec] = float(f["time"])
        print("[%s] train step fast (batch %d%s): %.2f s, peak RSS %.0f MB (start %.0f), "
              "%.1f effective forward GFLOP/s"
              % (name, batch, "" if prec == "fp32" else ", " + prec, f["time"], f["peak_mb"],
                 f["base_mb"], flops / f["time"] / 1e9))
        if not refs:
            pass
        elif cls.forward_sim_percaption is None:
            print("[%s] train step: no per-caption reference (%s)"
                  % (name, cls.no_reference_step_why))
        elif not args.no_ref:
            r = spawn(argv, "train", name, "ref")
            rec["train per-caption"] = float(r["time"])
            g, gr = f["grads"], r["grads"]
            print("[%s] train step per-caption: %.2f s, peak RSS %.0f MB (start %.0f)"
                  % (name, r["time"], r["peak_mb"], r["base_mb"]))
            print("[%s] train speedup %.2fx, memory %.2fx, loss %.6f vs %.6f, "
                  "||g - g_ref|| / ||g_ref|| = %.2e"
                  % (name, r["time"] / f["time"], f["peak_mb"] / r["peak_mb"],
                     float(f["loss"]), float(r["loss"]),
                     np.linalg.norm(g - gr) / np.linalg.norm(gr)))


def print_retrieve(name, args, r):
    print("%s one text query against %d images (%d captions): uncached %.2f s "
          "(load, hash, encode, cache, score), cached %.2f s (load, read the cache, "
          "score), on a loaded gallery %.3f s (%.3f s without gallery_inputs); as a "
          "command, cached: %.2f s; peak RSS %.0f MB"
          % (name, args.gallery, 5 * args.gallery, r["uncached"], r["cached"],
             r["query"], r["query_plain"], r["command"], r["peak_mb"]))


def bench_dual(argv, args, whats, name, results):
    """The jobs of a dual encoder, in each of its variants, and their lines; their times into
    results[(name, label)]."""
    cls = matcher(name)
    prec = args.precision
    for variant, label in cls.bench_variants(args):
        tag = "[%s, %s%s]" % (name, label, "" if prec == "fp32" else ", " + prec)
        rec = results.setdefault((name, label), {})
        if "eval" in whats:
            r = spawn(argv, "eval", name, variant)
            rec["eval " + prec] = float(r["time"])
            print("%s eval %d images x %d captions: %.1f s (images %.1f s, captions %.1f s, "
                  "scores %.2f s), peak RSS %.0f MB (start %.0f)"
                  % (tag, int(r["n_img"]), int(r["n_cap"]), r["time"], r["images"],
                     r["captions"], r["score"], r["peak_mb"], r["base_mb"]))
        if "retrieve" in whats:
            print_retrieve(tag, args, spawn(argv, "retrieve", name, variant))
        if "train" in whats:
            r = spawn(argv, "train", name, variant)
            rec["train " + prec] = float(r["time"])
            print("%s train step, batch %d%s: %.2f s, peak RSS %.0f MB (start %.0f)"
                  % (tag, args.batch, cls.bench_train_note, r["time"], r["peak_mb"],
                     r["base_mb"]))


if __name__ == "__main__":
    main()
