"""Benchmark of the matchers' hot paths (in the spirit of nanoGPT's bench.py).

Times, at full dimensions on random inputs: encoding, scoring n_img x n_cap pairs and one
training step, for SGR, SAF and NAAF, fast against the original per-caption computation. Prints
pairs/s, the effective GFLOP/s (FLOPs of the original algorithm for the same pairs / time), the
machine's matmul peak measured in the same run, peak memory, speedups and the largest
difference from the per-caption path. Every measured job runs in its own subprocess, so the
peak memories do not mix.

- SGR, SAF: `shard_attn_scores` (similarity.py) against the original's shards of 100 x 100
  pairs scored caption by caption (`EncoderSimilarity.forward_percaption`); the training step
  (`SGRAF.train_emb`) against the original's (all B x B pairs, caption by caption, one graph).
- NAAF: `NAAF.score`, i.e. `NAAF.forward_sim` after `val_start()` (every pair at the
  fixed test threshold `opt.thres_safe`, vectorised over captions), against the original's
  `shard_xattn`: shards of 128 x 128 pairs, caption by caption (`naaf.naaf_sims_percaption`,
  the original `xattn_score_test`). Both in float32 (the original evaluates float64 copies:
  `--naaf_ref_fp64`). The threshold is `--thres_safe`, default 0.3: the learned test threshold
  of the repository's NAAF fixture checkpoints (written by the original code: thres_safe
  0.2998, mismatched words' best-region cosine 0.334 +- 0.069). The embeddings lie near a
  32-dimensional subspace, so that each word's best-region cosine is 0.34 +- 0.07 as there and
  the threshold splits the words (independent random 1024-d vectors would leave every cosine
  below it, and the positive branch at 0). The training step is `NAAF.train_emb` alone:
  naaf.py has no per-caption training step to compare with (its threshold learner goes
  caption by caption in both), so NAAF's train job has no reference.

    python bench.py                      # SGR, SAF, NAAF: 100 images x 500 captions, batch 128
    python bench.py --quick              # small sanity run
    python bench.py --modules SGR --what eval --precision bf16
    python bench.py --modules NAAF       # NAAF only
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch


MODULES = ("SGR", "SAF", "NAAF")
NAAF_LATENT = 32  # NAAF's embeddings: the dimension of the subspace they lie near (see top)
NAAF_SHARD = 128  # the original NAAF evaluation's shard_xattn(..., shard_size=128)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="evaluation precision of the fast path (bf16: autocast)")
    p.add_argument("--daa_weight", type=float, default=0.0,
                   help="train jobs of SGR/SAF with the DAA loss at this weight ('--what daa' "
                        "times the step with --daa_weight, default 10, against without)")
    p.add_argument("--steps", type=int, default=2,
                   help="training steps timed per job after a full-size warm-up step (the "
                        "fastest is reported, at least 2; '--what daa' "
                        "alternates at least 3 of each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modules", default="SGR,SAF,NAAF", help="comma-separated: SGR, SAF, NAAF")
    p.add_argument("--what", default="encode,eval,train",
                   help="comma-separated: encode, eval, train, daa")
    p.add_argument("--no_ref", action="store_true", help="skip the per-caption reference")
    p.add_argument("--thres_safe", type=float, default=0.3,
                   help="NAAF's test threshold (a checkpoint's learned opt.thres_safe)")
    p.add_argument("--naaf_ref_fp64", action="store_true",
                   help="NAAF's per-caption reference in float64, as the original evaluates")
    p.add_argument("--quick", action="store_true", help="small sizes, a sanity run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [m for m in args.modules.split(",") if m not in MODULES]
    if unknown:
        p.error("--modules: unknown %s (choose from %s)" % (",".join(unknown), ",".join(MODULES)))
    if args.quick:
        args.n_img, args.n_cap, args.batch = 10, 50, 16
        args.img_dim, args.embed_size, args.sim_dim, args.word_dim = 256, 128, 64, 50
    return args


# ----------------------------------------------------------------------------- FLOPs

def original_flops(module, n_img, lens, R=36, d=1024, s=256, sgr_step=3, shard=100,
                   intra=True):
    """FLOPs (2 x multiply-adds, matmuls only) of the original per-caption algorithm for n_img
    images against captions of the given lengths, scored in shards of `shard` captions.
    Per pair with L words: SCAN scores (R x d x L) and context (L x R x d); sim_tranloc_w on L
    vectors (d -> s) and sim_tranglo_w on one; per SGR step three Linear(s, s) on the L+1 nodes
    and two (L+1) x (L+1) x s products; SAF: Linear(s, 1) and the weighted sum of the L+1
    nodes; sim_eval_w. Per caption: TextSA (two Linear(d, d) and Linear(d, 1) on L words).
    Per shard of captions: VisualSA on all the images (the original recomputes it per call).
    NAAF (xattn_score_test, `shard` images a shard): per pair the cosines (L x d x R) and the
    context (L x R x d), and with `intra` (evaluation) the smoothed mask (L x L x 1); per caption
    and image shard the word-word attention (L x d x L). intra=False: the training score."""
    if module == "NAAF":
        n_im_shards = -(-n_img // shard)
        return sum(n_img * (4 * L * R * d + (2 * L * L if intra else 0)) +
                   (n_im_shards * 2 * L * L * d if intra else 0) for L in lens)
    total = 0
    for L in lens:
        N = L + 1
        pair = 2 * R * d * L * 2 + 2 * L * d * s + 2 * d * s + 2 * s
        if module == "SGR":
            pair += sgr_step * (3 * 2 * N * s * s + 2 * 2 * N * N * s)
        else:
            pair += 2 * N * s + 2 * N * s
        total += n_img * pair + 2 * L * d * d + 2 * d * d + 2 * L * d
    n_shards = -(-len(lens) // shard)
    total += n_shards * n_img * (2 * R * d * d + 2 * d * d + 2 * R * d)
    return total


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

def make_model(args, module):
    """The matcher `module` names, with the original's defaults: SGRAF for SGR/SAF, naaf.NAAF
    for NAAF (its own options from naaf.complete_naaf_opt: lambda_softmax 20, the basic text
    encoder, learning rate 5e-4; the test threshold from --thres_safe)."""
    from model import SGRAF
    opt = SimpleNamespace(img_dim=args.img_dim, embed_size=args.embed_size,
                          sim_dim=args.sim_dim, word_dim=args.word_dim,
                          vocab_size=args.vocab_size, num_layers=1, bi_gru=True,
                          no_imgnorm=False, no_txtnorm=False, module_name=module, sgr_step=3,
                          grad_clip=2.0, margin=0.2, max_violation=True, learning_rate=2e-4,
                          device=args.device, precision=args.precision,
                          daa_weight=args.daa_weight, daa_rowwise=False)
    torch.manual_seed(args.seed)
    if module == "NAAF":
        import naaf
        del opt.sim_dim, opt.sgr_step, opt.bi_gru, opt.learning_rate  # SGRAF's only
        opt.thres_safe = args.thres_safe
        naaf.complete_naaf_opt(opt)
        return naaf.NAAF(opt), opt
    return SGRAF(opt), opt


def daa_semantics(model, args, rng):
    """DAA's semantics for a batch whose item k is caption k of a synthetic split of
    batch x 5 captions (random words over a 500-word vocabulary): sets the model's TF-IDF and
    returns the batch's caption ids."""
    words = ["w%d" % i for i in range(500)]
    caps = [" ".join(rng.choice(words, size=rng.integers(8, 20))) for _ in range(5 * args.batch)]
    model.set_semantics(caps)
    return list(range(args.batch))


def make_lengths(args, n, rng):
    return np.sort(rng.integers(args.min_len, args.max_len + 1, size=n))[::-1].copy()


def make_embeddings(args, rng, module="SGR"):
    """Random l2-normalised region and word embeddings, zero padded like encode_data's. NAAF:
    near a NAAF_LATENT-dimensional subspace, so that the cosines spread as a trained model's."""
    lens = rng.integers(args.min_len, args.max_len + 1, size=args.n_cap)
    if module == "NAAF":
        return naaf_embeddings(args, rng, lens)
    img = rng.standard_normal((args.n_img, 36, args.embed_size)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    cap = rng.standard_normal((args.n_cap, lens.max(), args.embed_size)).astype(np.float32)
    cap /= np.linalg.norm(cap, axis=-1, keepdims=True)
    cap *= (np.arange(lens.max())[None, :] < lens[:, None])[:, :, None]
    return img, cap, lens.tolist()


def naaf_embeddings(args, rng, lens, noise=0.3):
    """Unit vectors along z W + noise n: z ~ N(0, I_k), W a random k x d matrix of N(0, 1/k)
    entries (k = NAAF_LATENT), n ~ N(0, I_d). Cosines about N(0, 0.16), so each word's best of
    36 regions is at 0.34 +- 0.07 (d 1024; about the same at the --quick d 128)."""
    k, d = NAAF_LATENT, args.embed_size
    basis = rng.standard_normal((k, d)) * np.sqrt(1.0 / k)

    def vectors(*shape):
        v = rng.standard_normal(shape + (k,)) @ basis + noise * rng.standard_normal(shape + (d,))
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
    img = vectors(args.n_img, 36)
    cap = vectors(args.n_cap, int(lens.max()))
    cap *= (np.arange(lens.max())[None, :] < lens[:, None])[:, :, None]
    return img, cap, lens.tolist()


def make_batch(args, rng):
    n = args.batch
    lens = make_lengths(args, n, rng)
    images = torch.from_numpy(rng.standard_normal((n, 36, args.img_dim)).astype(np.float32))
    captions = torch.zeros(n, int(lens.max()), dtype=torch.int64)
    for k, L in enumerate(lens):
        captions[k, 0], captions[k, L - 1] = 1, 2
        captions[k, 1:L - 1] = torch.from_numpy(rng.integers(4, args.vocab_size, size=L - 2))
    return images, captions, lens.tolist()


# ----------------------------------------------------------------------------- jobs

def job_encode(args, module, ref):
    model, opt = make_model(args, module)
    model.val_start()
    rng = np.random.default_rng(args.seed)
    images = torch.from_numpy(rng.standard_normal((args.n_img, 36, args.img_dim))
                              .astype(np.float32))
    lens = make_lengths(args, args.n_cap, rng)
    captions = torch.randint(4, args.vocab_size, (args.n_cap, int(lens.max())))
    with torch.no_grad():
        model.forward_emb(images[:2], captions[:2], lens[:2].tolist())
        t = time.perf_counter()
        model.forward_emb(images, captions, lens.tolist())
        sync(args.device)
    return {"time": time.perf_counter() - t}


def job_eval(args, module, ref):
    if module == "NAAF":
        return job_eval_naaf(args, ref)
    from evaluation import shard_attn_scores
    model, opt = make_model(args, module)
    model.val_start()
    img, cap, lens = make_embeddings(args, np.random.default_rng(args.seed))
    with torch.no_grad():  # warm-up: lazy initialisations of the process
        (model.sim_enc.forward_percaption if ref else model.sim_enc)(
            torch.from_numpy(img[:2]), torch.from_numpy(cap[:3]), lens[:3])
    sync(args.device)
    t = time.perf_counter()
    if ref:
        sims = percaption_shard_scores(model, img, cap, lens)
    else:
        sims = shard_attn_scores(model, img, cap, lens, opt)
    sync(args.device)
    elapsed = time.perf_counter() - t
    return {"time": elapsed, "sims": sims}


def percaption_shard_scores(model, img_embs, cap_embs, cap_lens, shard_size=100):
    """The original shard_attn_scores: 100 x 100 shards, caption by caption."""
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(0, len(img_embs), shard_size):
        for j in range(0, len(cap_embs), shard_size):
            lens = cap_lens[j:j + shard_size]
            with torch.no_grad():
                im = torch.from_numpy(img_embs[i:i + shard_size]).to(model.device)
                ca = torch.from_numpy(cap_embs[j:j + shard_size, :max(lens)]).to(model.device)
                sim = model.sim_enc.forward_percaption(im, ca, lens)
            sims[i:i + shard_size, j:j + shard_size] = sim.cpu().numpy()
    return sims


def job_eval_naaf(args, ref):
    """NAAF: NAAF.score (the vectorised NAAF.forward_sim) or the original's shards of
    128 x 128 pairs, caption by caption, both at opt.thres_safe."""
    model, opt = make_model(args, "NAAF")
    model.val_start()
    img, cap, lens = make_embeddings(args, np.random.default_rng(args.seed), "NAAF")
    with torch.no_grad():  # warm-up: lazy initialisations of the process
        if ref:
            percaption_naaf_scores(model, img[:2], cap[:3], lens[:3], args.naaf_ref_fp64)
        else:
            model.score(img[:2], cap[:3], lens[:3])
    sync(args.device)
    t = time.perf_counter()
    if ref:
        sims = percaption_naaf_scores(model, img, cap, lens, args.naaf_ref_fp64)
    else:
        sims = model.score(img, cap, lens)
    sync(args.device)
    elapsed = time.perf_counter() - t
    return {"time": elapsed, "sims": sims}


def percaption_naaf_scores(model, img_embs, cap_embs, cap_lens, fp64=False,
                           shard_size=NAAF_SHARD):
    """The original NAAF shard_xattn: shard_size x shard_size shards, each scored caption by
    caption by xattn_score_test (naaf.naaf_sims_percaption) at opt.thres_safe."""
    from naaf import naaf_sims_percaption
    opt, dtype = model.opt, torch.float64 if fp64 else torch.float32
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(0, len(img_embs), shard_size):
        for j in range(0, len(cap_embs), shard_size):
            lens = cap_lens[j:j + shard_size]
            with torch.no_grad():
                im = torch.from_numpy(img_embs[i:i + shard_size]).to(model.device, dtype)
                ca = torch.from_numpy(cap_embs[j:j + shard_size]).to(model.device, dtype)
                sim = naaf_sims_percaption(im, ca, lens, opt.thres_safe, opt.lambda_softmax,
                                           intra=True)
            sims[i:i + shard_size, j:j + shard_size] = sim.cpu().numpy()
    return sims


def reference_train_step(model, images, captions, lengths, ids=None):
    """The original SGRAF `train_emb`, op for op: every B x B pair scored caption by caption
    (`forward_percaption`) in one graph, the hinge (+ DAA), backward, clip, Adam. Timed side by
    side in one process with the original code's own step, it runs at the same speed
    (the README's Speed section)."""
    img, cap, cl = model.forward_emb(images, captions, lengths)
    sims = model.sim_enc.forward_percaption(img, cap, cl)
    model.optimizer.zero_grad()
    loss = model.forward_loss(sims, ids=ids)  # the hinge (+ DAA)
    loss.backward()
    if model.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.params, model.grad_clip)
    model.optimizer.step()
    return loss.detach()


def set_dropout(model, on):
    for m in model.modules():
        for x in m.modules():
            if isinstance(x, torch.nn.Dropout):
                x.train(on)


def job_train(args, module, ref):
    """One training step at full size, as the original's `train_emb` runs in a training loop:
    a first full-size step (dropout off, so that the fast and the reference step compute the
    same function: its loss and clipped gradients are returned for the comparison), then
    max(2, --steps) steps with dropout on, the fastest reported. The first step is not timed:
    it also pays the first touch of all the memory the step needs (page faults, about 8 GB
    for the original's SGR step), which took 1.2-1.7x a later step on the machine this was
    developed on, and which a training loop pays once."""
    if module == "NAAF" and ref:
        raise ValueError("NAAF has no per-caption reference training step")
    rng = np.random.default_rng(args.seed + 1)
    images, captions, lens = make_batch(args, rng)
    model, opt = make_model(args, module)
    model.train_start()
    ids = daa_semantics(model, args, rng) if args.daa_weight > 0 else None
    if ref:
        def train_emb(images, captions, lengths):
            return reference_train_step(model, images, captions, lengths, ids)
    else:
        def train_emb(images, captions, lengths):
            return model.train_emb(images, captions, lengths, ids)
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


def job_daa(args, module, ref):
    """The training step with DAA against without, alternating on one model in one process
    (steps of separate processes vary by +-10% on a shared machine): the fastest of
    max(3, --steps) steps each."""
    rng = np.random.default_rng(args.seed + 1)
    images, captions, lens = make_batch(args, rng)
    model, opt = make_model(args, module)
    model.train_start()
    ids = daa_semantics(model, args, rng)
    loss_fn = model.daa
    model.train_emb(images, captions, lens, ids)  # warm-up at full size (see job_train)
    times = {"with": [], "without": []}
    for _ in range(max(3, args.steps)):
        for name in times:
            model.daa = loss_fn if name == "with" else None
            sync(args.device)
            t = time.perf_counter()
            model.train_emb(images, captions, lens, ids)
            sync(args.device)
            times[name].append(time.perf_counter() - t)
    return {"with": min(times["with"]), "without": min(times["without"])}


JOBS = {"encode": job_encode, "eval": job_eval, "train": job_train, "daa": job_daa}


def run_job(args):
    what, module, path = args.job.split(":")
    torch.set_num_threads(args.threads)
    base = peak_mem_mb(args.device)
    res = JOBS[what](args, module, path == "ref")
    res["peak_mb"] = peak_mem_mb(args.device)
    res["base_mb"] = base
    np.savez(args.out, **{k: np.asarray(v) for k, v in res.items()})


def spawn(argv, what, module, path):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.npz")
        subprocess.run([sys.executable, __file__] + argv +
                       ["--job", "%s:%s:%s" % (what, module, path), "--out", out], check=True)
        with np.load(out) as f:
            return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    if args.job:
        return run_job(args)
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
    for module in args.modules.split(","):
        if "encode" in whats:
            r = spawn(argv, "encode", module, "fast")
            print("[%s] encode %d images + %d captions: %.3f s, peak %.0f MB"
                  % (module, args.n_img, args.n_cap, r["time"], r["peak_mb"]))
        if "eval" in whats:
            # the lengths are drawn first, the same for every module
            _, _, lens = make_embeddings(args, np.random.default_rng(args.seed))
            naaf = module == "NAAF"
            flops = original_flops(module, args.n_img, lens, d=args.embed_size, s=args.sim_dim,
                                   shard=NAAF_SHARD if naaf else 100)
            pairs = args.n_img * args.n_cap
            f = spawn(argv, "eval", module, "fast")
            # NAAF's scores have no bf16 path: float32 whatever --precision says
            precision = "fp32, thres_safe %g" % args.thres_safe if naaf else args.precision
            print("[%s] eval fast (%s): %.2f s, %.0f pairs/s, %.1f effective GFLOP/s "
                  "(%.0f%% of fp32 peak, original %.0f GFLOP), peak RSS %.0f MB (start %.0f)"
                  % (module, precision, f["time"], pairs / f["time"],
                     flops / f["time"] / 1e9, 100 * flops / f["time"] / 1e9 / fp32, flops / 1e9,
                     f["peak_mb"], f["base_mb"]))
            if not args.no_ref:
                r = spawn(argv, "eval", module, "ref")
                ref_what = ("per-caption (%s)" % ("fp64" if args.naaf_ref_fp64 else "fp32")
                            if naaf else "per-caption")
                print("[%s] eval %s: %.2f s, %.0f pairs/s, %.1f effective GFLOP/s, "
                      "peak RSS %.0f MB (start %.0f)"
                      % (module, ref_what, r["time"], pairs / r["time"], flops / r["time"] / 1e9,
                         r["peak_mb"], r["base_mb"]))
                print("[%s] eval speedup %.2fx, max |fast - per-caption| = %.2e"
                      % (module, r["time"] / f["time"], np.abs(f["sims"] - r["sims"]).max()))
                if args.n_cap == 5 * args.n_img:
                    from evaluation import i2t, t2i
                    ra = np.array(i2t(None, None, None, r["sims"])[:3] +
                                  t2i(None, None, None, r["sims"])[:3])
                    fa = np.array(i2t(None, None, None, f["sims"])[:3] +
                                  t2i(None, None, None, f["sims"])[:3])
                    print("[%s] R@1,5,10 i2t/t2i per-caption %s, fast %s, max |diff| %.2f"
                          % (module, ra.round(1).tolist(), fa.round(1).tolist(),
                             np.abs(ra - fa).max()))
        if "daa" in whats and module != "NAAF":
            w = args.daa_weight if args.daa_weight > 0 else 10.0
            r = spawn(argv + ["--daa_weight", str(w)], "daa", module, "fast")  # last one wins
            print("[%s] train step (fastest of %d, alternating on one model) without DAA %.2f s, "
                  "with DAA (weight %g) %.2f s: %+.0f%%, peak RSS %.0f MB"
                  % (module, max(3, args.steps), r["without"], w, r["with"],
                     100 * (r["with"] / r["without"] - 1), r["peak_mb"]))
        if "train" in whats:
            lens = make_lengths(args, args.batch, np.random.default_rng(args.seed + 1))
            # the per-caption step scores all B x B pairs forward (backward ~2x more)
            flops = original_flops(module, args.batch, lens, d=args.embed_size, s=args.sim_dim,
                                   intra=False)
            f = spawn(argv, "train", module, "fast")
            print("[%s] train step fast: %.2f s, peak RSS %.0f MB (start %.0f), "
                  "%.1f effective forward GFLOP/s" % (module, f["time"], f["peak_mb"],
                                                       f["base_mb"], flops / f["time"] / 1e9))
            if module == "NAAF":
                print("[NAAF] train step: no per-caption reference (naaf.py has none; the "
                      "step's threshold learner goes caption by caption)")
            elif not args.no_ref:
                r = spawn(argv, "train", module, "ref")
                g, gr = f["grads"], r["grads"]
                print("[%s] train step per-caption: %.2f s, peak RSS %.0f MB (start %.0f)"
                      % (module, r["time"], r["peak_mb"], r["base_mb"]))
                print("[%s] train speedup %.2fx, memory %.2fx, loss %.6f vs %.6f, "
                      "||g - g_ref|| / ||g_ref|| = %.2e"
                      % (module, r["time"] / f["time"], f["peak_mb"] / r["peak_mb"],
                         float(f["loss"]), float(r["loss"]),
                         np.linalg.norm(g - gr) / np.linalg.norm(gr)))


if __name__ == "__main__":
    main()
