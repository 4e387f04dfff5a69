"""bench.py --what two_stage: what two-stage retrieval costs and saves (issue 23), at full
dimensions (2048-d regions, d 1024, 36 regions), on random inputs.

The shortlist model is the registry's first matcher that embeds images and captions alone
(`Matcher.embeds_alone`), at BERT-base size where it has a BERT (its `bench_variants`' last);
the re-ranker is each cross-attention matcher of --modules. Like bench.py, this file names no
matcher: everything goes through the contract.

Two jobs, each in its own process (bench.py's spawn), so that their peak memories do not mix:
- `eval`: the re-ranker's pairs/s in evaluation's blocks (--n_img x --n_cap) and on shortlisted
  pairs (one image against the ~6K captions that shortlist it or that it shortlists, as a
  two-stage evaluation scores them), both encoders' images/s and captions/s, and the
  shortlist's score matrix at Flickr30K size, all measured; from them, Flickr30K-sized (1000 x
  5000) and COCO-5K-sized (5000 x 25000) evaluation times, exhaustive and two-stage at
  K = --rerank_k: extrapolated, and printed as such.
- `query`: text queries against --big_gallery synthetic images: their region features drawn
  chunk by chunk (never all in RAM: 29 GB at 100K) and encoded by the re-ranker into an
  index.GalleryStore (its regions in --store_dtype, its gallery_inputs), memory-mapped, beside
  the shortlist's vectors; a flat and an HNSW shortlist of --query_k, re-ranked; the latency of
  each step (warm: the best and the median of --queries queries after one), peak RSS, HNSW's
  recall@K against flat over those queries, and the largest score difference between the
  float16 and float32 regions (recomputed for a few images). The shortlist's vectors, gallery
  and queries alike, are drawn around CLUSTERS random centers (`clustered_vectors`) rather than
  encoded: its model with random weights maps random features to nearly one direction (at full
  dimensions, cosine 0.976 +- 0.001 between images, the rest isotropic noise), a shape no
  trained encoder has and on which a nearest-neighbour index is measured badly; and its image
  encoder takes about 30 minutes for 100K images on 2 cores. Each query's text is still encoded
  by the shortlist model (its BERT-base, timed) and by the re-ranker.
"""
import json
import os
import shutil
import tempfile
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch

import errors
import index as shortlist_index

SIZES = (("Flickr30K 1K", 1000), ("COCO 5K", 5000))  # images (x 5 captions)
PROBE_IMAGES = 8       # images scored against their shortlisted captions (pairs/s)
ENCODE_BATCH = 32      # items per timed encoder call
CHUNK = 512            # images per chunk of the synthetic gallery
F16_CHECK = 64         # images whose float16 and float32 regions are both scored
CLUSTERS = 1000        # the synthetic shortlist vectors' clusters
UNITS_TIMED = 3        # cells of evaluation.py --shortlist's pairs timed per size


def add_options(p):
    g = p.add_argument_group("--what two_stage (bench_two_stage.py)")
    g.add_argument("--rerank_k", type=int, default=128,
                   help="two-stage evaluation: candidates re-ranked per query")
    g.add_argument("--query_k", type=int, default=100,
                   help="the large gallery's text query: candidates re-ranked")
    g.add_argument("--big_gallery", type=int, default=100000,
                   help="images of the synthetic gallery of the text query (0: skip it)")
    g.add_argument("--store", default=None, metavar="DIR",
                   help="keep the synthetic gallery there (a killed build continues; "
                        "default: a temporary directory, removed)")
    g.add_argument("--store_dtype", default="float16", choices=["float16", "float32"],
                   help="the re-ranker's stored regions")
    g.add_argument("--queries", type=int, default=20,
                   help="text queries timed (after one) and for HNSW's recall")


def check_args(args):
    errors.check_positive(args, ["rerank_k", "query_k", "queries"])
    errors.check_nonnegative(args, ["big_gallery"])
    if args.quick:
        args.rerank_k, args.query_k, args.queries = 16, 10, 3
        args.big_gallery = min(args.big_gallery, 1500)


def shortlist_matcher():
    """(name, class): the registry's first matcher that embeds alone."""
    import matchers
    for name in matchers.MATCHERS:
        cls = matchers.matcher_class(name)
        if cls.embeds_alone:
            return name, cls
    raise ValueError("no matcher of the registry embeds alone")


def shortlist_model(args):
    name, cls = shortlist_matcher()
    variant, label = cls.bench_variants(args)[-1] if cls.dual_encoder else (None, None)
    torch.manual_seed(args.seed + 7)
    model, _ = cls.bench_model(args, name, variant) if variant else cls.bench_model(args, name)
    model.val_start()
    return model, name if label is None else "%s, %s" % (name, label)


def reranker_model(args, name):
    import matchers
    torch.manual_seed(args.seed)
    model, _ = matchers.matcher_class(name).bench_model(args, name)
    model.val_start()
    return model


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def encode_rates(model, args, rng):
    """(seconds per image, seconds per caption) of the model's encoders, measured on
    ENCODE_BATCH random items (Matcher.bench_train_inputs): forward_emb minus forward_text."""
    saved = args.batch
    args.batch = ENCODE_BATCH
    images, captions, lens, _, _ = model.bench_train_inputs(args, rng)
    args.batch = saved
    n = len(images)
    with torch.no_grad():
        model.forward_emb(images[:2], captions[:2], lens[:2])  # warm-up
        _, text = timed(model.forward_text, captions, lens)
        # the images, with one caption (its time, text / n, taken off)
        _, both = timed(model.forward_emb, images, captions[:1], lens[:1])
    return max(both - text / n, 1e-9) / n, text / n



def job_eval(args, name):
    """The measured rates of a two-stage evaluation's parts (see the module's docstring)."""
    import matchers
    cls = matchers.matcher_class(name)
    rng = np.random.default_rng(args.seed)
    rer = reranker_model(args, name)
    img, cap, lens, extra = cls.bench_embeddings(
        args, rng, rng.integers(args.min_len, args.max_len + 1, size=args.n_cap))
    with torch.no_grad():
        rer.score(img[:2], cap[:3], lens[:3], **_rows(cls, extra, slice(0, 2), slice(0, 3)))
        _, t_block = timed(rer.score, img, cap, lens, **extra)
    # shortlisted pairs: each image against ~(1 + 5) K captions (its own shortlist, and the
    # captions whose shortlists hold it: 5N K / N on average)
    per = 6 * args.rerank_k
    probe = SimpleNamespace(**dict(vars(args), n_img=PROBE_IMAGES))
    pimg, pcap, plens, pextra = cls.bench_embeddings(
        probe, rng, rng.integers(args.min_len, args.max_len + 1, size=per))
    t_short = 0.0
    with torch.no_grad():
        for i in range(PROBE_IMAGES):
            _, t = timed(rer.score, pimg[i:i + 1], pcap, plens,
                         **_rows(cls, pextra, slice(i, i + 1), slice(None)))
            t_short += t
    ev = {}
    if not any(w == "image" for w in cls.score_inputs.values()):
        for label, n in SIZES:
            ev[label] = evaluation_rate(args, rer, n if not args.quick else n // 10, rng)
    r_img, r_cap = encode_rates(rer, args, rng)
    sl, sl_label = shortlist_model(args)
    s_img, s_cap = encode_rates(sl, args, rng)
    d = args.embed_size
    vi = rng.standard_normal((1000, d)).astype(np.float32)
    vc = rng.standard_normal((5000, d)).astype(np.float32)
    sims, t_sl = timed(sl.score, vi, vc, [1] * 5000)
    t0 = time.perf_counter()
    np.argpartition(-sims, args.rerank_k, axis=1)
    np.argpartition(-sims.T, args.rerank_k, axis=1)
    t_sl += time.perf_counter() - t0
    return {"block_rate": args.n_img * args.n_cap / t_block,
            "short_rate": PROBE_IMAGES * per / t_short, "per": per,
            "r_img": r_img, "r_cap": r_cap, "s_img": s_img, "s_cap": s_cap,
            "sl_score_f30k": t_sl, "sl_label": sl_label,
            **{"ev_%d" % i: np.array(ev[label]) for i, (label, _) in enumerate(SIZES)
               if label in ev}}


def evaluation_rate(args, rer, n, rng, units_timed=UNITS_TIMED):
    """(pairs/s, pairs, units) of evaluation.py --shortlist's own pair scoring
    (twostage.PairUnits.score) for an n x 5n split at K = --rerank_k: random shortlists (each
    image's K captions, each caption's K images), their union cut into the shard grid's
    cells, and `units_timed` of those cells scored, each whole or image by image as
    evaluation.py scores it. The embeddings are one random image and one random caption seen
    everywhere (np.broadcast_to: a COCO-sized split in a few MB); the lengths vary."""
    import evaluation
    import matrix
    import twostage
    c, k = 5 * n, args.rerank_k
    found = {"cand_i2t": rng.integers(0, c, size=(n, k)),  # (a repeat is a pair less)
             "cand_t2i": rng.integers(0, n, size=(c, k))}
    keys = twostage.union_pairs([found], [(0, n, 0, c)], k, c)
    units = twostage.PairUnits(keys, [(0, n, 0, c)], c)
    img, cap, _, extra = type(rer).bench_embeddings(
        SimpleNamespace(**dict(vars(args), n_img=1)), rng, np.array([args.max_len]))
    lens = rng.integers(args.min_len, args.max_len + 1, size=c).tolist()
    enc = evaluation.Encoded(np.broadcast_to(img[0], (n,) + img.shape[1:]),
                             np.broadcast_to(cap[0], (c,) + cap.shape[1:]), lens, extra)
    units_timed = 2 if args.quick else units_timed
    pick = rng.choice(len(units), size=min(units_timed, len(units)), replace=False)
    t, pairs = 0.0, 0
    with torch.no_grad(), matrix.quiet([(rer, enc)]), warnings.catch_warnings():
        # the broadcast arrays are read-only, which torch.from_numpy warns about
        warnings.simplefilter("ignore", UserWarning)
        scorers = [(rer, enc)]
        _, pre = timed(units.precomputed, scorers)  # once per evaluation: in its time below
        units.score(scorers, int(pick[0]))  # warm-up
        for u in pick:
            _, dt = timed(units.score, scorers, int(u))
            t, pairs = t + dt, pairs + units.size(int(u))
    return pairs / t, units.n_pairs, len(units), pre


def _rows(cls, extra, img_rows, cap_rows):
    return {k: v[img_rows] if cls.score_inputs.get(k) == "image" else v[cap_rows]
            for k, v in extra.items()}


def report_eval(name, args, r):
    k = args.rerank_k
    sl = str(r["sl_label"])
    print("[%s] two-stage: re-ranker pairs/s (measured): %.0f in blocks of %d x %d, %.0f on "
          "shortlisted pairs (1 image x %d captions per call)"
          % (name, r["block_rate"], args.n_img, args.n_cap, r["short_rate"], int(r["per"])))
    print("[%s] two-stage: encoding (measured, batches of %d): re-ranker %.1f images/s, %.0f "
          "captions/s; shortlist (%s) %.1f images/s, %.1f captions/s"
          % (name, ENCODE_BATCH, 1 / r["r_img"], 1 / r["r_cap"], sl, 1 / r["s_img"],
             1 / r["s_cap"]))
    rows = []
    for label, n in SIZES:
        c = 5 * n
        exh = n * c / r["block_rate"]
        pairs = (n + c) * k          # the union is at most this (i2t + t2i shortlists)
        rerank = pairs / r["short_rate"]
        ev = r.get("ev_%d" % [x for x, _ in SIZES].index(label))
        shortlist = r["sl_score_f30k"] * (n * c) / (1000 * 5000)
        enc_r = n * r["r_img"] + c * r["r_cap"]
        enc_s = n * r["s_img"] + c * r["s_cap"]
        print("[%s] two-stage, %s (%d x %d), K = %d (extrapolated from the measured rates):"
              % (name, label, n, c, k))
        print("    scoring: exhaustive %.0f s (%d pairs); two-stage re-ranking %.0f s (at most "
              "%d pairs) + shortlist scores and top K %.1f s: %.1fx faster (re-ranking "
              "alone %.1fx)" % (exh, n * c, rerank, pairs, shortlist,
                                exh / (rerank + shortlist), exh / rerank))
        if ev is not None:
            rate, n_pairs, n_units, pre = ev
            own = n_pairs / rate + pre
            print("    evaluation.py --shortlist's own pair scoring (twostage.PairUnits, %d "
                  "pairs in %d units, a sample of them timed): %.0f pairs/s, %.0f s with the "
                  "re-ranker's per-image and per-caption inputs (%.0f s, measured): %.1fx "
                  "faster than exhaustive (re-ranking alone %.1fx)"
                  % (n_pairs, n_units, rate, own, pre, exh / (own + shortlist), exh / own))
            rerank = own  # the whole line below: evaluation.py's own scoring
        total_exh, total_ts = enc_r + exh, enc_r + enc_s + shortlist + rerank
        print("    encoding: re-ranker %.0f s; shortlist %.0f s (its captions %.0f s)"
              % (enc_r, enc_s, c * r["s_cap"]))
        print("    whole evaluation, encoding included: exhaustive %.0f s, two-stage %.0f s: "
              "%.1fx faster" % (total_exh, total_ts, total_exh / total_ts))
        rows.append((label, exh, rerank, shortlist, enc_r, enc_s, total_exh, total_ts))
    return rows


# ----------------------------------------------------------------------------- the large gallery

def _features(args, start, stop):
    """The synthetic gallery's region features of images start..stop-1 (non-negative, as
    BUTD's), drawn from a generator seeded by the chunk: the same whenever drawn again."""
    rng = np.random.default_rng([args.seed, start])
    x = rng.standard_normal((stop - start, 36, args.img_dim), dtype=np.float32)
    return torch.from_numpy(np.abs(x, out=x))


def _dummy_caption(args):
    lens = [args.min_len]
    return torch.randint(5, min(50, args.vocab_size), (1, lens[0])), lens  # ids any vocabulary has


def _centers(args):
    rng = np.random.default_rng([args.seed, 1])
    c = rng.standard_normal((CLUSTERS, args.embed_size))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered_vectors(args, rng, n, centers):
    """n unit vectors around random ones of the centers (cosine about 0.5 to their center,
    about 0 to the others): the clustered shape of a trained dual encoder's embeddings."""
    x = centers[rng.integers(0, len(centers), size=n)]
    x = x + rng.standard_normal((n, centers.shape[1])) / np.sqrt(centers.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _encode_chunk(args, rer, start, stop, centers):
    """The stored arrays of images start..stop-1: their region features drawn and encoded by
    the re-ranker (its gallery_inputs too), and their shortlist vectors (clustered_vectors)."""
    feats = _features(args, start, stop)
    cap, lens = _dummy_caption(args)
    with torch.no_grad():
        regions = rer.forward_emb(feats, cap, lens)[0].float().cpu().numpy()
    rng = np.random.default_rng([args.seed, 2, start])
    out = {"vectors": clustered_vectors(args, rng, stop - start, centers), "regions": regions}
    out.update(rer.gallery_inputs(regions))
    return out


def build_store(args, name, root):
    """The synthetic gallery in `root` (index.GalleryStore, resumable) and its HNSW index."""
    rer = reranker_model(args, name)
    centers = _centers(args)
    identity = {"reranker": name, "vectors": "clustered %d" % CLUSTERS, "n": args.big_gallery,
                "seed": args.seed, "img_dim": args.img_dim, "d": args.embed_size,
                "dtype": args.store_dtype}
    t0 = time.perf_counter()
    store = shortlist_index.GalleryStore.build(
        root, args.big_gallery, lambda a, b: _encode_chunk(args, rer, a, b, centers), identity,
        chunk=CHUNK, dtypes={"regions": args.store_dtype}, tool="bench.py",
        flag="--store")
    t_store = time.perf_counter() - t0
    path, times = os.path.join(root, "hnsw.faiss"), os.path.join(root, "build_times.json")
    if os.path.exists(path) and os.path.exists(times):  # built by an earlier run
        with open(times, encoding="utf-8") as f:
            out = json.load(f)
        out["reused"] = 1.0
        return out
    idx, t_hnsw = timed(shortlist_index.ShortlistIndex, store.array("vectors"), "hnsw")
    idx.save(path)
    out = {"t_store": t_store, "t_hnsw": t_hnsw, "store_mb": store.nbytes() / 2 ** 20}
    with open(times, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return out


def job_query(args, name):
    """Text queries against the stored gallery (see the module's docstring)."""
    root = args.store
    store = shortlist_index.GalleryStore(root)
    vecs, regions = store.array("vectors"), store.array("regions")
    inputs = [k for k in store.meta["arrays"] if k not in ("vectors", "regions")]
    flat = shortlist_index.ShortlistIndex(vecs, "flat", progress=False)
    hnsw = shortlist_index.ShortlistIndex.load(vecs, os.path.join(root, "hnsw.faiss"))
    sl, _ = shortlist_model(args)
    rer = reranker_model(args, name)
    rng = np.random.default_rng(args.seed + 3)
    saved = args.batch
    args.batch = args.queries + 1
    _, s_caps, s_lens, _, _ = sl.bench_train_inputs(args, rng)
    _, r_caps, r_lens, _, _ = rer.bench_train_inputs(args, rng)
    args.batch = saved
    qvecs = clustered_vectors(args, rng, args.queries + 1, _centers(args))
    k = args.query_k
    times = {"flat": [], "hnsw": []}
    parts = {}
    recalls = []
    for q in range(args.queries + 1):
        for kind, idx in (("flat", flat), ("hnsw", hnsw)):
            t0 = time.perf_counter()
            with torch.no_grad():
                cap, lens = sl.forward_text(s_caps[q:q + 1, :s_lens[q]], s_lens[q:q + 1])
            qcap = cap.float().cpu().numpy()
            sl.shortlist_embeddings(np.zeros((0, qcap.shape[1]), np.float32), qcap,
                                    [int(x) for x in lens])
            qvec = qvecs[q]  # searched: a vector of the gallery's distribution
            t1 = time.perf_counter()
            ids, _ = idx.search(qvec, k)
            t2 = time.perf_counter()
            with torch.no_grad():
                rcap, rlens = rer.forward_text(r_caps[q:q + 1, :r_lens[q]], r_lens[q:q + 1])
            rows = np.sort(ids)
            scores = rer.score(np.asarray(regions[rows], dtype=np.float32),
                               rcap.float().cpu().numpy(), [int(x) for x in rlens],
                               **{n: np.array(store.array(n)[rows]) for n in inputs})[:, 0]
            np.argsort(-scores, kind="stable")
            t3 = time.perf_counter()
            if q:  # the first query warms up
                times[kind].append(t3 - t0)
                for part, t in (("text", t1 - t0), ("search", t2 - t1), ("rerank", t3 - t2)):
                    parts.setdefault((kind, part), []).append(t)
            if kind == "hnsw" and q:
                recalls.append(len(np.intersect1d(ids, flat.search(qvec, k)[0])) / float(k))
    # float16 regions against float32 ones, for F16_CHECK images and one query
    m = min(F16_CHECK, store.meta["n"])
    f32 = _encode_chunk(args, rer, 0, m, _centers(args))
    with torch.no_grad():
        rcap, rlens = rer.forward_text(r_caps[:1, :r_lens[0]], r_lens[:1])
    rc = rcap.float().cpu().numpy()
    s16 = rer.score(np.asarray(regions[:m], dtype=np.float32), rc, [int(x) for x in rlens],
                    **{n: np.array(store.array(n)[:m]) for n in inputs})
    s32 = rer.score(f32["regions"], rc, [int(x) for x in rlens],
                    **{n: f32[n] for n in inputs})
    out = {"n": store.meta["n"], "k": k, "recall": np.mean(recalls),
           "recall_min": np.min(recalls), "f16_diff": float(np.abs(s16 - s32).max()),
           "dtype": str(regions.dtype)}
    for kind in times:
        out["%s_best" % kind] = min(times[kind])
        out["%s_median" % kind] = float(np.median(times[kind]))
        for part in ("text", "search", "rerank"):
            out["%s_%s" % (kind, part)] = float(np.median(parts[(kind, part)]))
    return out


def report_query(name, args, b, r):
    print("[%s] two-stage text query, %d synthetic images (built%s in %.0f s: regions encoded "
          "by the re-ranker, stored in %s; shortlist vectors drawn around %d clusters, as "
          "trained embeddings cluster; store %.0f MB memory-mapped; HNSW index built in %.0f s)"
          % (name, int(r["n"]), " by an earlier run" if "reused" in b else "",
             float(b["t_store"]), r["dtype"], CLUSTERS,
             float(b["store_mb"]), float(b["t_hnsw"])))
    for kind in ("flat", "hnsw"):
        print("    %s shortlist, re-rank K = %d, warm: %.3f s best, %.3f s median of %d "
              "(the shortlist's query encoding %.3f s, search %.3f s, re-ranking %.3f s)"
              % (kind, int(r["k"]), r[kind + "_best"], r[kind + "_median"], args.queries,
                 r[kind + "_text"], r[kind + "_search"], r[kind + "_rerank"]))
    print("    HNSW (M 32, efConstruction 80, efSearch 256) recall@%d against flat: mean %.3f, "
          "min %.3f over %d queries; peak RSS %.0f MB; %s regions' scores within %.1e of "
          "float32's (%d images)"
          % (int(r["k"]), r["recall"], r["recall_min"], args.queries, r["peak_mb"],
             r["dtype"], r["f16_diff"], min(F16_CHECK, int(r["n"]))))


def run(argv, args, name, spawn):
    """bench.py's two_stage jobs for the re-ranker `name`, and their lines."""
    import matchers
    cls = matchers.matcher_class(name)
    report_eval(name, args, spawn(argv, "two_stage", name, "eval"))
    if not args.big_gallery:
        return
    if any(w == "image" for w in cls.score_inputs.values()):
        print("[%s] two-stage text query: skipped (its score needs per-image inputs that "
              "this synthetic gallery does not draw)" % name)
        return
    root = args.store or tempfile.mkdtemp(prefix="two_stage_")
    tmp = args.store is None
    try:
        if tmp:
            os.rmdir(root)
        sub = argv + ["--store", root]
        b = spawn(sub, "two_stage", name, "build")
        report_query(name, args, b, spawn(sub, "two_stage", name, "query"))
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)


JOBS = {"eval": job_eval, "build": lambda args, name: build_store(args, name, args.store),
        "query": job_query}
