"""Benchmark of the matchers' hot paths (in the spirit of nanoGPT's bench.py).

Times, at full dimensions on random inputs: encoding, scoring n_img x n_cap pairs and one
training step, for SGR, SAF and NAAF, fast against a per-caption reference: our reconstruction
of the original computation, op for op. Prints pairs/s, the effective GFLOP/s (FLOPs of the
original algorithm for the same pairs / time), the machine's matmul peak measured in the same
run, peak memory, speedups over the reference and the largest difference from it. The
speedups are ratios against the reference, not against the original code: for SGR and SAF the
reference was calibrated against the original SGRAF/DAA code measured side by side in one run
(within 10% of its time, training and evaluation; README, Speed), so there they stand for
ratios against the original; for NAAF and GSMN only `--gsmn_original` times original code. Every measured job runs in its own subprocess, so the
peak memories do not mix.

- SGR, SAF: `shard_attn_scores` (similarity.py) against the original's shards of 100 x 100
  pairs scored caption by caption (`EncoderSimilarity.forward_percaption`); the training step
  (`SGRAF.train_emb`) against `reference_train_step`, the original `train_emb` op for op (all
  B x B pairs, caption by caption, one graph).
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
- GSMN: `GSMN.score` (gsmn.gsmn_scores: every pair, both attention directions, the graphs as
  per-node MLPs) against the original's `shard_xattn`: shards of 80 x 80 pairs, caption by
  caption through the literal graphs (`GSMN.forward_sim_percaption`), on boxes normalised in
  [0, 1] (so that the geometry gains differ between regions). The training step
  (`GSMN.train_emb`, the fast path with autograd) against the original's (both graphs'
  per-caption loops over B x B pairs), at batch `--gsmn_batch` (64, the README's Flickr30K
  batch: the per-caption step at 128 needs about 20 GB). `--gsmn_original DIR` also times the
  ORIGINAL code's `shard_xattn` on the same pairs with the same weights: DIR is a checkout of
  CrossmodalGroup/GSMN made to run under Python 3 on CPU (README, GSMN section).

    python bench.py                      # every matcher: 100 images x 500 captions, batch 128
    python bench.py --quick              # small sanity run
    python bench.py --modules SGR --what eval --precision bf16
    python bench.py --modules NAAF       # NAAF only
    python bench.py --modules HREM       # HREM: 1000 images x 5000 captions, demo and base BERT
    python bench.py --what retrieve --modules SGR,NAAF   # one text query, 1000-image gallery

`--what retrieve` times retrieve.py end to end on a gallery written to a temporary directory
(`--gallery` images of random features at `--img_dim`, 5 synthetic captions each, the shipped
Flickr30K vocabulary, a randomly initialised checkpoint at full dimensions; HREM: each BERT of
--hrem_bert, with bert_demo's WordPiece vocabulary): one text query uncached (load, hash the
files, encode the split, cache it, score), then cached (load, read the cache, score), then a
query on the gallery already loaded (`Gallery.search_text`: the query's own cost), and the
cached query as a command (`python retrieve.py ...`, imports included).

- HREM: a dual encoder, so its evaluation is encoding (each image once, each caption once, in
  batches of 128) plus one blocked matrix product (`HREM.score`): timed end to end on random
  region features and random token ids (lengths --min_len to --max_len, [CLS]/[SEP] included),
  `--hrem_n_img` images x 5 captions each, with BERT at the demo's size (bert_demo/config.json,
  2 layers of 128) and at BERT-base's (12 layers of 768, random weights: no download). Its
  training step is `HREM.train_emb` at --batch with the instance-level graph losses on (past the
  warm-up), with the augmentations. No reference here: the speed against the original code is
  measured side by side with it (README, Speed).
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

import errors

MODULES = ("SGR", "SAF", "NAAF", "GSMN", "HREM")
HREM_BERTS = ("demo", "base")
NAAF_LATENT = 32  # NAAF's embeddings: the dimension of the subspace they lie near (see top)
NAAF_SHARD = 128  # the original NAAF evaluation's shard_xattn(..., shard_size=128)
GSMN_SHARD = 80   # the original GSMN evaluation's shard_xattn(..., shard_size=80)


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
    p.add_argument("--modules", default=",".join(MODULES),
                   help="comma-separated: " + ", ".join(MODULES))
    p.add_argument("--hrem_n_img", type=int, default=1000,
                   help="HREM evaluation: images (x 5 captions)")
    p.add_argument("--hrem_bert", default="demo,base",
                   help="HREM: BERT sizes, comma-separated: demo (bert_demo/), base (BERT-base)")
    p.add_argument("--what", default="encode,eval,train",
                   help="comma-separated: encode, eval, train, daa, retrieve")
    p.add_argument("--no_ref", action="store_true", help="skip the per-caption reference")
    p.add_argument("--thres_safe", type=float, default=0.3,
                   help="NAAF's test threshold (a checkpoint's learned opt.thres_safe)")
    p.add_argument("--naaf_ref_fp64", action="store_true",
                   help="NAAF's per-caption reference in float64, as the original evaluates")
    p.add_argument("--gallery", type=int, default=1000,
                   help="'--what retrieve': images of the gallery (5 captions each)")
    p.add_argument("--gsmn_batch", type=int, default=64,
                   help="GSMN's training batch (its README's Flickr30K batch)")
    p.add_argument("--gsmn_original", default=None, metavar="DIR",
                   help="also time the original GSMN code's shard_xattn from this checkout "
                        "(made to run under Python 3 on CPU)")
    p.add_argument("--quick", action="store_true", help="small sizes, a sanity run")
    p.add_argument("--seed", type=int, default=0)
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
    errors.check_choices(args, "modules", MODULES)
    errors.check_choices(args, "what", WHATS)
    errors.check_choices(args, "hrem_bert", HREM_BERTS)
    errors.check_positive(args, ["hrem_n_img", "gsmn_batch"])
    if args.gsmn_original is not None:
        errors.check_dir(args.gsmn_original, "--gsmn_original %s" % args.gsmn_original,
                         expected="a checkout of the original GSMN code")
    errors.check_device(args.device)
    if args.quick:
        args.n_img, args.n_cap, args.batch, args.gsmn_batch = 10, 50, 16, 16
        args.img_dim, args.embed_size, args.sim_dim, args.word_dim = 256, 128, 64, 50
        args.gallery = 50
        args.hrem_n_img, args.hrem_bert = 20, "demo"
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
    GSMN (shard_xattn): per pair, both directions' scores (R x d x L) and contexts, the
    visual graph's patch operator (R x 8 x R x n) and the textual one's (L x 8 x L x n), the
    conv and head Linears on every node; per caption the word-word attention.
    NAAF (xattn_score_test, `shard` images a shard): per pair the cosines (L x d x R) and the
    context (L x R x d), and with `intra` (evaluation) the smoothed mask (L x L x 1); per caption
    and image shard the word-word attention (L x d x L). intra=False: the training score."""
    if module == "GSMN":  # both directions' scores and contexts; the graphs (K = 8 kernels)
        n, h = 16, 32
        return sum(n_img * (8 * L * R * d + 2 * R * 8 * R * n + 2 * R * (n * h + h * h + h) +
                            2 * L * 8 * L * n + 2 * L * (n * h + h * h + h)) + 2 * L * L * d
                   for L in lens)
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
    if module == "GSMN":
        import gsmn
        del opt.sim_dim, opt.sgr_step, opt.daa_weight, opt.daa_rowwise  # SGRAF's only
        for k, v in gsmn.GSMN.defaults.items():
            setattr(opt, k, v)
        opt.learning_rate = 2e-4
        return gsmn.GSMN(opt), opt
    if module == "NAAF":
        import naaf
        del opt.sim_dim, opt.sgr_step, opt.bi_gru, opt.learning_rate  # SGRAF's only
        opt.thres_safe = args.thres_safe
        naaf.complete_naaf_opt(opt)
        return naaf.NAAF(opt), opt
    return SGRAF(opt), opt


def make_hrem(args, bert):
    """HREM with the original's defaults and BERT at the demo's size or BERT-base's (random
    weights)."""
    import argparse as ap

    from transformers import BertConfig, BertModel

    import hrem
    opt = ap.Namespace(img_dim=args.img_dim, embed_size=args.embed_size, no_imgnorm=False,
                       no_txtnorm=False, grad_clip=2.0, margin=0.2, max_violation=False,
                       device=args.device, data_name="f30k_precomp", bert_path=hrem.BERT_DEMO,
                       bert_init="random")
    hrem.HREM.complete_opt(opt)
    cfg = BertConfig.from_pretrained(hrem.BERT_DEMO) if bert == "demo" else BertConfig()
    torch.manual_seed(args.seed)
    return hrem.HREM(opt, bert=BertModel(cfg)), opt


def hrem_captions(args, rng, n, vocab_size):
    """Random token ids ([CLS] 2 ... [SEP] 3, others >= 5), 0-padded, and their lengths."""
    lens = rng.integers(args.min_len, args.max_len + 1, size=n)
    ids = torch.zeros(n, int(lens.max()), dtype=torch.int64)
    for k, L in enumerate(lens):
        ids[k, 0], ids[k, L - 1] = 2, 3
        ids[k, 1:L - 1] = torch.from_numpy(rng.integers(5, vocab_size, size=L - 2))
    return ids, torch.from_numpy(lens)


def job_hrem_eval(args, bert):
    """Encode --hrem_n_img images once and 5x as many captions in batches of 128, then
    HREM.score: the evaluation's cost on random inputs."""
    model, opt = make_hrem(args, bert)
    model.val_start()
    rng = np.random.default_rng(args.seed)
    n_img, n_cap, bs = args.hrem_n_img, 5 * args.hrem_n_img, 128
    images = torch.from_numpy(rng.standard_normal((n_img, 36, args.img_dim))
                              .astype(np.float32)).abs()
    caps, lens = hrem_captions(args, rng, n_cap, model.txt_enc.bert.config.vocab_size)
    full = torch.full((bs,), 36)
    with torch.no_grad():  # warm-up
        model.forward_emb(images[:2], caps[:2], lens[:2], img_lengths=full[:2])
        sync(args.device)
        t0 = time.perf_counter()
        img = torch.cat([model.img_enc(images[i:i + bs].to(args.device),
                                       full[:len(images[i:i + bs])].to(args.device))
                         for i in range(0, n_img, bs)])
        sync(args.device)
        t1 = time.perf_counter()
        cap = []
        for j in range(0, n_cap, bs):
            L = int(lens[j:j + bs].max())
            cap.append(model.txt_enc(caps[j:j + bs, :L].to(args.device),
                                     lens[j:j + bs].to(args.device)))
        cap = torch.cat(cap)
        sync(args.device)
        t2 = time.perf_counter()
        sims = model.score(img.float().cpu().numpy(), cap.float().cpu().numpy(), lens.tolist())
        t3 = time.perf_counter()
    return {"time": t3 - t0, "images": t1 - t0, "captions": t2 - t1, "score": t3 - t2,
            "shape": sims.shape}


def job_hrem_train(args, bert):
    """One HREM.train_emb at --batch, graph losses on, the augmentations drawn in the step (with
    bert_demo's vocabulary for the random tokens)."""
    model, opt = make_hrem(args, bert)
    rng = np.random.default_rng(args.seed + 1)
    n = args.batch
    images = torch.from_numpy(rng.standard_normal((n, 36, args.img_dim))
                              .astype(np.float32)).abs()
    vocab = model.txt_enc.bert.config.vocab_size
    words = [[[int(t)] for t in rng.integers(5, vocab, size=rng.integers(
        args.min_len - 2, args.max_len - 1))] for _ in range(n)]
    caps = [[2] + [w[0] for w in ws] + [3] for ws in words]
    lens = [len(c) for c in caps]
    captions = torch.zeros(n, max(lens), dtype=torch.int64)
    for k, c in enumerate(caps):
        captions[k, :len(c)] = torch.tensor(c)
    img_ids = list(range(n))
    model.criterion.iter_count = opt.warmup  # the graph losses on
    model.train_start()
    extra = dict(img_ids=img_ids, img_lengths=torch.full((n,), 36), words=words)
    model.train_emb(images[:8], captions[:8], lens[:8], img_ids[:8],
                    **{k: v[:8] for k, v in extra.items()})  # warm-up
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t = time.perf_counter()
        loss = model.train_emb(images, captions, lens, img_ids, **extra)
        sync(args.device)
        times.append(time.perf_counter() - t)
    return {"time": min(times), "loss": float(loss)}


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
    if module == "GSMN":
        return job_eval_gsmn(args, ref)
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


def reference_train_step(model, images, captions, lengths, ids=None, boxes=None):
    """The original SGRAF `train_emb`, op for op: every B x B pair scored caption by caption
    (`forward_percaption`) in one graph, the hinge (+ DAA), backward, clip, Adam. Timed side by
    side in one process with the original code's own step, it runs at the same speed
    (the README's Speed section)."""
    img, cap, cl = model.forward_emb(images, captions, lengths)
    if boxes is not None:  # GSMN: its literal per-caption graphs
        sims = model.forward_sim_percaption(img, cap, cl, boxes)
    else:
        sims = model.sim_enc.forward_percaption(img, cap, cl)
    model.optimizer.zero_grad()
    loss = model.forward_loss(sims, ids=ids)  # the hinge (+ DAA)
    loss.backward()
    model.after_backward()
    if model.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.params, model.grad_clip)
    model.optimizer.step()
    return loss.detach()


def set_dropout(model, on):
    for m in model.modules():
        for x in m.modules():
            if isinstance(x, torch.nn.Dropout):
                x.train(on)


def gsmn_boxes(n_img, rng):
    """Boxes normalised to [0, 1] (x1 <= x2, y1 <= y2), (n_img, 36, 4) float32."""
    xy = rng.uniform(0, 0.7, (n_img, 36, 2))
    return np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (n_img, 36, 2))], 2) \
        .astype(np.float32)


def job_eval_gsmn(args, ref):
    """GSMN: GSMN.score (gsmn_scores), or the original's shards of 80 x 80 pairs, caption by
    caption through the literal graphs."""
    model, opt = make_model(args, "GSMN")
    model.val_start()
    rng = np.random.default_rng(args.seed)
    img, cap, lens = make_embeddings(args, rng)
    boxes = gsmn_boxes(args.n_img, rng)
    with torch.no_grad():  # warm-up: lazy initialisations of the process
        if ref:
            percaption_gsmn_scores(model, img[:2], cap[:3], lens[:3], boxes[:2])
        else:
            model.score(img[:2], cap[:3], lens[:3], boxes=torch.from_numpy(boxes[:2]))
    sync(args.device)
    t = time.perf_counter()
    if ref:
        sims = percaption_gsmn_scores(model, img, cap, lens, boxes)
    else:
        sims = model.score(img, cap, lens, boxes=torch.from_numpy(boxes))
    sync(args.device)
    return {"time": time.perf_counter() - t, "sims": sims}


def percaption_gsmn_scores(model, img_embs, cap_embs, cap_lens, boxes, shard_size=GSMN_SHARD):
    """The original GSMN shard_xattn: shard_size x shard_size shards, each scored by the
    original forward_sim (both graphs' per-caption loops)."""
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(0, len(img_embs), shard_size):
        for j in range(0, len(cap_embs), shard_size):
            lens = cap_lens[j:j + shard_size]
            with torch.no_grad():
                im = torch.from_numpy(img_embs[i:i + shard_size]).to(model.device)
                ca = torch.from_numpy(cap_embs[j:j + shard_size]).to(model.device)
                bx = torch.from_numpy(boxes[i:i + shard_size]).to(model.device)
                sim = model.forward_sim_percaption(im, ca, lens, bx)
            sims[i:i + shard_size, j:j + shard_size] = sim.cpu().numpy()
    return sims


def job_original_gsmn(args, module, ref):
    """The ORIGINAL code's shard_xattn (from the checkout --gsmn_original) on the eval job's
    pairs, timed; then our fast path with the original model's weights, for the difference.
    The original's modules (model, evaluation, data, vocab, ...) are imported first, under
    their own names, and removed before ours are imported."""
    rng = np.random.default_rng(args.seed)
    img, cap, lens = make_embeddings(args, rng)
    boxes = gsmn_boxes(args.n_img, rng)
    opt = argparse.Namespace(img_dim=args.img_dim, embed_size=args.embed_size,
                             word_dim=args.word_dim, vocab_size=args.vocab_size, num_layers=1,
                             bi_gru=True, no_imgnorm=False, no_txtnorm=False, feat_dim=16,
                             num_block=16, hid_dim=32, out_dim=1, lambda_softmax=9.0,
                             is_sparse=False, margin=0.2, max_violation=True, grad_clip=2.0,
                             learning_rate=2e-4)
    sys.path.insert(0, os.path.abspath(args.gsmn_original))
    import evaluation as orig_evaluation
    import model as orig_model
    torch.manual_seed(args.seed)
    model = orig_model.GSMN(opt)
    model.val_start()
    deps = [[[0, 1]]] * len(lens)
    with torch.no_grad():
        orig_evaluation.shard_xattn(model, img[:2], cap[:3], boxes[:2].astype(np.float64),
                                    deps[:3], lens[:3], opt, shard_size=GSMN_SHARD)
        t = time.perf_counter()
        sims = orig_evaluation.shard_xattn(model, img, cap, boxes.astype(np.float64), deps,
                                           lens, opt, shard_size=GSMN_SHARD)
        elapsed = time.perf_counter() - t
    state = [{k: v.clone() for k, v in sd.items()} for sd in model.state_dict()]
    theirs = {os.path.splitext(f)[0] for f in os.listdir(args.gsmn_original)
              if f.endswith(".py")}
    for name in theirs:
        sys.modules.pop(name, None)
    sys.path.pop(0)
    ours, _ = make_model(args, "GSMN")
    ours.load_state_dict(state)  # strict: the original's names
    fast = ours.score(img, cap, lens, boxes=torch.from_numpy(boxes))
    return {"time": elapsed, "sims": sims, "fast_diff": np.abs(fast - sims).max()}


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
    if module == "GSMN":
        args.batch = args.gsmn_batch
    images, captions, lens = make_batch(args, rng)
    model, opt = make_model(args, module)
    model.train_start()
    ids = daa_semantics(model, args, rng) if args.daa_weight > 0 else None
    boxes = torch.from_numpy(gsmn_boxes(len(lens), rng)) if module == "GSMN" else None
    if ref:
        def train_emb(images, captions, lengths):
            if module == "GSMN":
                return reference_train_step(model, images, captions, lengths, ids, boxes)
            return reference_train_step(model, images, captions, lengths, ids)
    elif module == "GSMN":
        def train_emb(images, captions, lengths):
            return model.train_emb(images, captions, lengths, ids, boxes=boxes)
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


def write_gallery(args, module, root, bert=None):
    """A SCAN-format split `test` of args.gallery images (random non-negative features, the
    synthetic generator's captions), the shipped Flickr30K vocabulary, and a checkpoint of
    `module` at the benchmark's dimensions: (checkpoint, data_path, vocab_path). HREM: BERT of
    the size `bert` (make_hrem), its --bert_path a folder of that config and bert_demo's
    WordPiece vocabulary (which covers the synthetic captions)."""
    import argparse as ap
    import shutil

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
    if module == "HREM":
        import hrem
        model, opt = make_hrem(args, bert)
        opt.bert_path = os.path.join(root, "bert")
        model.txt_enc.bert.config.save_pretrained(opt.bert_path)
        for f in ("vocab.txt", "tokenizer_config.json"):
            shutil.copy(os.path.join(hrem.BERT_DEMO, f), opt.bert_path)
    else:
        model, opt = make_model(args, module)
    opt = ap.Namespace(**dict(vars(opt), data_name="gallery_precomp", data_path=data_path,
                              vocab_path=vocab_path, workers=0, batch_size=128))
    del opt.device
    ckpt = os.path.join(root, "ckpt", "model_best.pth.tar")
    torch.save({"epoch": 0, "model": model.state_dict(), "best_rsum": 0, "opt": opt,
                "Eiters": 0}, ckpt)
    return ckpt, data_path, vocab_path, caps


def job_retrieve(args, module, ref, bert=None):
    import retrieve
    with tempfile.TemporaryDirectory() as root:
        ckpt, data_path, vocab_path, caps = write_gallery(args, module, root, bert)
        # files older than the cache's "changed just now" window, as a user's data are
        time.sleep(getattr(args, "settle", retrieve.RACY_NS / 1e9 + 0.5))
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
        # (HREM reads no --vocab_path: its checkpoint's --bert_path has the vocabulary)
        vocab_flag = [] if module == "HREM" else ["--vocab_path", vocab_path]
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "retrieve.py"),
                        "--model_path", ckpt, "--data_path", data_path] + vocab_flag +
                       ["--split", "test", "--device", args.device, "--cache_dir", cache,
                        "--query", queries[2]], check=True, capture_output=True)
        command = time.perf_counter() - t
    return {"uncached": uncached, "cached": cached, "query": min(times),
            "query_plain": min(plain), "command": command}


JOBS = {"encode": job_encode, "eval": job_eval, "train": job_train, "daa": job_daa,
        "original": job_original_gsmn, "retrieve": job_retrieve}
HREM_JOBS = {"eval": job_hrem_eval, "train": job_hrem_train,
             "retrieve": lambda args, bert: job_retrieve(args, "HREM", False, bert)}
WHATS = ("encode", "eval", "train", "daa", "retrieve")  # "original": spawned for --gsmn_original


def run_job(args):
    what, module, path = args.job.split(":")
    torch.set_num_threads(args.threads)
    base = peak_mem_mb(args.device)
    if module == "HREM":  # path: the BERT size
        res = HREM_JOBS[what](args, path)
    else:
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

@errors.exit_on_error
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
        if module == "HREM":
            bench_hrem(argv, args, whats)
            continue
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
            ref_shard = {"NAAF": NAAF_SHARD, "GSMN": GSMN_SHARD}.get(module, 100)
            pairs = args.n_img * args.n_cap
            f = spawn(argv, "eval", module, "fast")
            # NAAF's scores have no bf16 path: float32 whatever --precision says
            precision = ("fp32, thres_safe %g" % args.thres_safe if naaf else
                         "fp32" if module == "GSMN" else args.precision)
            print("[%s] eval fast (%s): %.2f s, %.0f pairs/s, %.1f effective GFLOP/s "
                  "(%.0f%% of fp32 peak, original %.0f GFLOP), peak RSS %.0f MB (start %.0f)"
                  % (module, precision, f["time"], pairs / f["time"],
                     flops / f["time"] / 1e9, 100 * flops / f["time"] / 1e9 / fp32, flops / 1e9,
                     f["peak_mb"], f["base_mb"]))
            if not args.no_ref:
                r = spawn(argv, "eval", module, "ref")
                ref_what = ("per-caption (%s)" % ("fp64" if args.naaf_ref_fp64 else "fp32")
                            if naaf else "per-caption")
                ref_what += ", shards of %d x %d" % (ref_shard, ref_shard)
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
                if module == "GSMN" and args.gsmn_original:
                    o = spawn(argv, "original", module, "ref")
                    print("[GSMN] eval ORIGINAL shard_xattn (%s): %.2f s, peak RSS %.0f MB; "
                          "per-caption / original %.3f, fast speedup over the original %.2fx, "
                          "max |fast - original| = %.2e"
                          % (args.gsmn_original, o["time"], o["peak_mb"], r["time"] / o["time"],
                             o["time"] / f["time"], float(o["fast_diff"])))
        if "daa" in whats and module in ("SGR", "SAF"):
            w = args.daa_weight if args.daa_weight > 0 else 10.0
            r = spawn(argv + ["--daa_weight", str(w)], "daa", module, "fast")  # last one wins
            print("[%s] train step (fastest of %d, alternating on one model) without DAA %.2f s, "
                  "with DAA (weight %g) %.2f s: %+.0f%%, peak RSS %.0f MB"
                  % (module, max(3, args.steps), r["without"], w, r["with"],
                     100 * (r["with"] / r["without"] - 1), r["peak_mb"]))
        if "retrieve" in whats:
            print_retrieve("[%s]" % module, args, spawn(argv, "retrieve", module, "fast"))
        if "train" in whats:
            batch = args.gsmn_batch if module == "GSMN" else args.batch
            lens = make_lengths(args, batch, np.random.default_rng(args.seed + 1))
            # the per-caption step scores all B x B pairs forward (backward ~2x more)
            flops = original_flops(module, batch, lens, d=args.embed_size, s=args.sim_dim,
                                   intra=False)
            f = spawn(argv, "train", module, "fast")
            print("[%s] train step fast (batch %d): %.2f s, peak RSS %.0f MB (start %.0f), "
                  "%.1f effective forward GFLOP/s"
                  % (module, batch, f["time"], f["peak_mb"], f["base_mb"],
                     flops / f["time"] / 1e9))
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


def print_retrieve(name, args, r):
    print("%s one text query against %d images (%d captions): uncached %.2f s "
          "(load, hash, encode, cache, score), cached %.2f s (load, read the cache, "
          "score), on a loaded gallery %.3f s (%.3f s without gallery_inputs); as a "
          "command, cached: %.2f s; peak RSS %.0f MB"
          % (name, args.gallery, 5 * args.gallery, r["uncached"], r["cached"],
             r["query"], r["query_plain"], r["command"], r["peak_mb"]))


def bench_hrem(argv, args, whats):
    for bert in args.hrem_bert.split(","):
        name = "[HREM, %s BERT]" % ("demo (2 x 128)" if bert == "demo" else "base (12 x 768)")
        if "eval" in whats:
            r = spawn(argv, "eval", "HREM", bert)
            print("%s eval %d images x %d captions: %.1f s (images %.1f s, captions %.1f s, "
                  "scores %.2f s), peak RSS %.0f MB (start %.0f)"
                  % (name, args.hrem_n_img, 5 * args.hrem_n_img, r["time"], r["images"],
                     r["captions"], r["score"], r["peak_mb"], r["base_mb"]))
        if "retrieve" in whats:
            print_retrieve(name, args, spawn(argv, "retrieve", "HREM", bert))
        if "train" in whats:
            r = spawn(argv, "train", "HREM", bert)
            print("%s train step, batch %d, graph losses on: %.2f s, peak RSS %.0f MB "
                  "(start %.0f)" % (name, args.batch, r["time"], r["peak_mb"], r["base_mb"]))


if __name__ == "__main__":
    main()
