"""Evaluation: encode a split, score every (image, caption) pair, and report R@K both ways.

Follows the originals' `evaluation.py` (SCAN's, which the others copy): the same functions
(`encode_data`, `shard_attn_scores`, `i2t`, `t2i`, `evalrank`) and the same printed lines, for
Flickr30K 1K test, COCO 5-fold 1K (`--fold5`) and COCO full 5K (`--split testall`), and
ensembles (the mean of two models' similarity matrices).

Any matcher of the registry (matchers.py) is evaluated the same way: the checkpoint (ours or the
original authors') is recognised by its contents, with no flag; the model is rebuilt from the
options saved in it, reads the split with its own vocabulary and data, embeds it
(`forward_emb`) and scores every pair (its `score`). Any two checkpoints make an ensemble: each
model encodes the split its own way, and the similarity matrices are averaged.

    python evaluation.py --data_path data --split test \
        --model_path runs/f30k_precomp_<module_name>/checkpoint/model_best.pth.tar
    python evaluation.py --model_path A.pth.tar --model_path2 B.pth.tar --split test
    torchrun --standalone --nproc_per_node 4 evaluation.py --model_path ... --save_sims s.npy
    python evaluation.py ... --plots plots/   # score distributions, recall@K curves, ranks
With no flags it evaluates DEFAULT_MODEL_PATH on DEFAULT_DATA_PATH (edit them and run, as with
the original script).

At scale (README, "Evaluate at scale"): the matrix is scored in shards (blocks of images x
blocks of captions, the same grid whatever the number of processes, so the numbers are too);
under torchrun every process encodes the split and scores its share of the shards, and rank 0
assembles the matrix, writes and prints. `--save_sims FILE.npy` writes the matrix as it is
scored (a memory-mapped .npy) with a record of the finished shards beside it
(`FILE.npy.record`, see outputs.claim_output): the same command run again after a crash or a
kill continues where it stopped; a file that is not this evaluation's is refused. Each recorded
shard carries the crc32 of its scores: a shard damaged on disk is scored again, never served.
No NaN or Inf reaches a result: the encodings and each shard's scores are checked.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import daa
import data
import distributed
import errors
import matchers
import opts
import outputs
import matrix
import twostage
from ranking import i2t, t2i
from checkpoint import load_checkpoint
from data import get_test_loader
from meters import AverageMeter, LogCollector  # noqa: F401  (the original exposes them here)

log = logging.getLogger(__name__)

# where train.py puts the best checkpoint of its default matcher on Flickr30K
DEFAULT_MODEL_PATH = os.path.join("runs", "f30k_precomp_%s" % matchers.DEFAULT, "checkpoint",
                                  "model_best.pth.tar")
DEFAULT_MODEL_PATH2 = None  # set to a second checkpoint to evaluate the ensemble
DEFAULT_DATA_PATH = "data"
DEFAULT_SPLIT = "test"
DEFAULT_FOLD5 = False
# --fold5: COCO 1K, five folds of 1000 images (and their 5000 captions) of the 5K split


# ----------------------------------------------------------------------------- encoding

class Encoded(tuple):
    """What `encode_data` returns: the original's (img_embs, cap_embs, cap_lens), and in
    `extra` the per-image and per-caption inputs that the matcher's scoring needs (its
    `score_inputs`), passed to `model.score` as keyword arguments."""

    def __new__(cls, img_embs, cap_embs, cap_lens, extra=None):
        self = super().__new__(cls, (img_embs, cap_embs, cap_lens))
        self.extra = extra or {}
        return self


def encode_data(model, data_loader, img_stride=1, progress=True):
    """Embed every item of `data_loader` in eval mode (a progress bar unless `progress` is
    False).

    Returns img_embs (N, R, d), cap_embs (N, max_len, d) zero padded, cap_lens (N,), in the
    dataset's order, as float32 (the original keeps float64 copies of float32 values; the
    values are the same); global embeddings ((N, d)) for matchers that score by a dot product.
    With `img_stride=k` only the images of items 0, k, 2k, ... are kept (the evaluation keeps
    every 5th image anyway), which saves 4/5 of the memory.
    """
    model.val_start()
    n = len(data_loader.dataset)
    n_img = (n + img_stride - 1) // img_stride
    inputs = getattr(model, "score_inputs", {})
    extra = {k: [None] * (n_img if where == "image" else n) for k, where in inputs.items()}
    img_embs, cap_parts, cap_lens = None, [None] * n, np.zeros(n, dtype=np.int64)
    for batch in tqdm(data_loader, desc="encode", leave=False,
                      disable=None if progress else True):
        images, captions, lengths, ids = batch
        with torch.no_grad():
            img_emb, cap_emb, _ = model.forward_emb(images, captions, lengths, **batch.extra)
        img_emb = img_emb.float().cpu().numpy()
        cap_emb = cap_emb.float().cpu().numpy()
        if img_embs is None:
            img_embs = np.zeros((n_img,) + img_emb.shape[1:], dtype=np.float32)
        for j, nid in enumerate(ids):
            if nid % img_stride == 0:
                img_embs[nid // img_stride] = img_emb[j]
            cap_parts[nid] = cap_emb[j, :lengths[j]] if cap_emb.ndim == 3 else cap_emb[j]
            cap_lens[nid] = lengths[j]
            for k, where in inputs.items():
                if where == "caption":
                    extra[k][nid] = batch.extra[k][j]
                elif nid % img_stride == 0:
                    extra[k][nid // img_stride] = batch.extra[k][j]
    if cap_parts[0].ndim == 1:  # global caption vectors
        cap_embs = np.stack(cap_parts).astype(np.float32, copy=False)
    else:
        cap_embs = np.zeros((n, int(cap_lens.max()), cap_parts[0].shape[-1]), dtype=np.float32)
        for k, part in enumerate(cap_parts):
            cap_embs[k, :len(part)] = part
    return Encoded(img_embs, cap_embs, cap_lens.tolist(), extra)


def check_encoded(enc, label, where):
    """No NaN or Inf in a split's encodings (a NaN in one image's features gives a NaN image
    embedding, whose scores would rank anywhere): a DataError naming the images or captions."""
    img_embs, cap_embs, _ = enc
    for what, x in (("images", img_embs), ("captions", cap_embs)):
        rows = matrix.nonfinite_rows(x)
        if rows:
            raise errors.error("embeddings_nonfinite", where, what=what, indices=matrix.indices_text(rows),
                               model=label)


# ----------------------------------------------------------------------------- similarity

def shard_attn_scores(model, img_embs, cap_embs, cap_lens, opt, shard_size=None):
    """The (n_images, n_captions) float64 similarity matrix, the original's name for the
    scoring: every matcher scores with its own `score` (the cross-attention ones shard by
    shard, `shard_size` as the original's 100, or None for shards sized by the memory
    available). `opt.precision` (e.g. bf16) applies where the matcher supports it."""
    model.opt.precision = (getattr(opt, "precision", None) or
                           getattr(model.opt, "precision", None) or "fp32")
    return model.score(img_embs, cap_embs, cap_lens, shard_size=shard_size)


# ----------------------------------------------------------------------------- plots

PLOT_KMAX = 100  # recall@K curves for K = 1..PLOT_KMAX
SCORE_BINS = 60


def _recall_at(ranks, ks):
    # the expression of ranking.metrics, so that K = 1, 5, 10 are the printed numbers to the last bit
    return np.array([100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks])


def plot_data(sims, fold5=False, kmax=PLOT_KMAX):
    """What `--plots` draws for one similarity matrix (plots.evaluation_figures): recall@K for
    K = 1..kmax both ways, from the ranks of `i2t` and `t2i` (so that K = 1, 5, 10 are the
    printed R@1, R@5, R@10), the ground truth's ranks (0 = first), and the histograms of the
    scores of the matching pairs (caption j and image j // 5) and of all the others. `fold5`:
    within the five 1000-image folds, recalls averaged over the folds as the printed means."""
    sims = np.asarray(sims)
    blocks = ([sims] if not fold5 else
              [sims[i * 1000:(i + 1) * 1000, i * 5000:(i + 1) * 5000] for i in range(5)])
    ks = np.arange(1, kmax + 1)
    lo = min(float(b.min()) for b in blocks)
    hi = max(float(b.max()) for b in blocks)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, SCORE_BINS + 1)
    rec = {"i2t": [], "t2i": []}
    ranks = {"i2t": [], "t2i": []}
    pos_hist = np.zeros(SCORE_BINS, dtype=np.int64)
    all_hist = np.zeros(SCORE_BINS, dtype=np.int64)
    pos_sum = all_sum = 0.0
    for b in blocks:
        for way, fn in (("i2t", i2t), ("t2i", t2i)):
            _, (r, _) = fn(None, None, None, b, return_ranks=True)
            ranks[way].append(r)
            rec[way].append(_recall_at(r, ks))
        per = b.shape[1] // b.shape[0]
        pos = b[np.arange(b.shape[1]) // per, np.arange(b.shape[1])]   # caption j, image j // 5
        pos_hist += np.histogram(pos, bins=edges)[0]
        pos_sum += float(pos.sum())
        for start in range(0, len(b), 256):  # row chunks: no full-size temporaries
            chunk = b[start:start + 256]
            all_hist += np.histogram(chunk, bins=edges)[0]
            all_sum += float(chunk.sum())
    n_pos = int(pos_hist.sum())
    n_neg = int(all_hist.sum()) - n_pos
    return {"k": ks, "fold5": fold5, "n_images": sims.shape[0], "n_captions": sims.shape[1],
            "recall_i2t": np.array(rec["i2t"]).mean(axis=0),
            "recall_t2i": np.array(rec["t2i"]).mean(axis=0),
            "ranks_i2t": np.concatenate(ranks["i2t"]), "ranks_t2i": np.concatenate(ranks["t2i"]),
            "edges": edges, "pos_hist": pos_hist, "neg_hist": all_hist - pos_hist,
            "pos_mean": pos_sum / max(n_pos, 1), "neg_mean": (all_sum - pos_sum) / max(n_neg, 1)}


def model_labels(paths, opts_):
    """Legend labels of the models of an ensemble: matcher and file name (the path where two
    would read the same)."""
    labels = ["%s (%s)" % (o.module_name, os.path.basename(p)) for p, o in zip(paths, opts_)]
    if len(set(labels)) < len(labels):
        labels = ["%s (%s)" % (o.module_name, p) for p, o in zip(paths, opts_)]
    return labels


# ----------------------------------------------------------------------------- evalrank

def complete_opt(opt, matcher=None):
    """Options missing from an (older, or an original's) checkpoint: the matcher's own
    defaults, then the shared ones."""
    if matcher is not None:
        matcher.complete_opt(opt)
    for k, v in vars(opts.build_parser().parse_args([])).items():
        if not hasattr(opt, k):
            setattr(opt, k, v)
    return opt


def load_model(model_path, data_path=None, vocab_path=None, device=None, feat_format=None,
               data_name=None, precision=None, overrides=None):
    """The model of a checkpoint (ours or the authors'; its matcher recognised from its
    contents), its options and its vocabulary: (model, opt, vocab, checkpoint). `overrides`:
    {option: value} set over the checkpoint's (the matchers' evaluation flags)."""
    checkpoint = load_checkpoint(model_path)
    name = matchers.recognise(checkpoint, model_path)
    matcher = matchers.matcher_class(name)
    opt = complete_opt(checkpoint["opt"], matcher)
    opt.module_name = name  # an original's opt may not say it
    if data_name is not None:
        opt.data_name = data_name
    if data_path is not None:
        opt.data_path = data_path
    if feat_format is not None:
        opt.feat_format = feat_format
    if precision is not None:
        opt.precision = precision
    for k, v in (overrides or {}).items():
        setattr(opt, k, v)
    if vocab_path is not None:
        opt.vocab_path = vocab_path
    elif not os.path.isdir(opt.vocab_path):  # the authors' absolute paths
        opt.vocab_path = "vocab"
    opt.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab, vocab_file = matcher.vocabulary(opt)
    opt.vocab_size = len(vocab)
    opt.vocab_file = vocab_file  # what the --save_sims record identifies the vocabulary by
    model = matcher.for_checkpoint(opt)
    matchers.check_fits(model, checkpoint, model_path, vocab_file)
    model.load_state_dict(checkpoint["model"])
    return model, opt, vocab, checkpoint


def _print_results(r, ri, log=print):
    ar = (r[0] + r[1] + r[2]) / 3
    ari = (ri[0] + ri[1] + ri[2]) / 3
    rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
    log("rsum: %.1f" % rsum)
    log("Average i2t Recall: %.1f" % ar)
    log("Image to text: %.1f %.1f %.1f %.1f %.1f" % tuple(r))
    log("Average t2i Recall: %.1f" % ari)
    log("Text to image: %.1f %.1f %.1f %.1f %.1f" % tuple(ri))
    return rsum


# ----------------------------------------------------------------------------- evalrank

def evalrank(model_path, data_path=None, split="dev", fold5=False, model_path2=None,
             vocab_path=None, data_name=None, save_sims=None, device=None, feat_format=None,
             precision=None, overrides=None, check_flags=False, overwrite=False,
             plots=None, shortlist=None, rerank_k=None):
    """Evaluate a checkpoint (or the ensemble of two) on a split and print the original lines.
    `fold5=True`: COCO 5-fold 1K (the split must have 5000 images; only the folds are scored).
    `precision='bf16'` scores under bf16 autocast where the matcher supports it (faster where
    the hardware has bf16; not the original's numbers). `overrides`: the matchers' evaluation
    flags ({option: value}). `check_flags` (the command line): refuse a --vocab_path that no
    model reads. `save_sims`: write the matrix there as
    it is scored, and continue an interrupted run of the same evaluation (`overwrite`: start
    afresh, replacing whatever the file is). Under torchrun every process scores its share and
    rank 0 alone prints, writes and returns the dict of results (None elsewhere). `plots=DIR`:
    also draw the score distributions, recall@K curves and ground-truth ranks (plots.py; each
    model and the ensemble)."""
    check_arguments(plots, data_name, data_path, device)
    ks = check_two_stage(shortlist, rerank_k, plots, save_sims, overwrite)
    rank, device = join_processes(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    saved = matrix.SavedSims(matrix.sims_path(save_sims), overwrite) if save_sims and rank == 0 else None
    try:
        loaded, scorers, data_loader, shape = distributed.agree(
            lambda: _prepare(model_path, model_path2, data_path, split, fold5, vocab_path,
                             data_name, device, feat_format, precision, say, overrides,
                             check_flags))
        if shortlist:
            out = two_stage(shortlist, ks, loaded, scorers, shape, saved, rank, say,
                            dict(data_path=data_path, split=split, fold5=fold5,
                                 data_name=data_name, device=device, feat_format=feat_format,
                                 overrides=overrides))
            distributed.finish()
            return out
        shards = matrix.shard_grid(matrix.score_regions(*shape, fold5=fold5))
        done = distributed.agree(
            lambda: claim_sims(saved, loaded, scorers, data_path, split, fold5, shape, shards,
                               overrides), master_only=True)
        # --plots of an ensemble draws each model too: its own matrix, scored with the mean
        each = bool(plots) and len(scorers) > 1
        sims, own = score(scorers, shards, done, shape, saved, each, rank, say)
        if rank != 0:
            distributed.finish()
            return None
        say("Images: %d, Captions: %d" % shape)
        result = report(sims, fold5, captions=data_loader.dataset.captions[:shape[1]])
        if plots:
            result.update(draw_plots(plots, loaded, sims, own, each, fold5, split, say))
        distributed.finish()
        return result
    finally:
        if saved is not None:
            saved.close()
        distributed.abandon()


def check_arguments(plots, data_name, data_path, device):
    """evalrank's checks that need no file read, before any compute."""
    if plots:  # never over a file that evaluation.py --plots did not make
        import plots as plotting
        outputs.check_outputs(plotting.eval_paths(plots), "evaluation.py --plots", "--plots")
    if data_name is not None:
        errors.check_data_name(data_name, data_path or "DIR")
    distributed.check_device(device)


def join_processes(device):
    """This process's rank and device; under torchrun, it joins the process group."""
    ddp, rank, local_rank, _ = distributed.env()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        device = distributed.local_device(device, local_rank)
        distributed.init(device)
    return rank, device


def claim_sims(saved, loaded, scorers, data_path, split, fold5, shape, shards, overrides):
    """Rank 0 claims the --save_sims file (`saved`, None without it) for this evaluation:
    the shards an earlier run of the same evaluation scored there."""
    if saved is None:
        return set()
    datasets = [dl.dataset for dl in dict.fromkeys(dl for _, _, dl in scorers)]
    ident = matrix.sims_identity([(m, o, p) for m, o, p in loaded], datasets, split, fold5, shape,
                          shards, overrides)
    info = {"checkpoints": [p for _, _, p in loaded], "data_path": data_path,
            "command": " ".join(sys.argv)}
    if saved.overwrite or not os.path.exists(saved.path):  # room for the whole matrix
        outputs.check_space(saved.path, 8 * shape[0] * shape[1], "the (%d, %d) float64 "
                            "matrix" % tuple(shape), "--save_sims")
    try:
        done = saved.claim(ident, shape, shards, info=info)
    except OSError as e:
        reason = outputs.os_failure(e)
        if reason is None:
            raise
        raise outputs.write_failed(saved.path, reason, kept="nothing was scored") from None
    errors.on_interrupt("the shards of %s scored so far are saved" % saved.path,
                        "run the same command again: it continues from them")
    return done


def encode_scorers(scorers, rank):
    """[(model, its encodings of the split)] for every (model, opt, loader), checked (no NaN
    or Inf); rank 0 shows the bars."""
    encoded = []
    for model, _, dl in scorers:
        enc = encode_data(model, dl, img_stride=dl.dataset.im_div, progress=rank == 0)
        check_encoded(enc, model.opt.module_name,
                      getattr(dl.dataset, "feat_path", None) or "the split")
        encoded.append((model, enc))
    return encoded


def score(scorers, shards, done, shape, saved, each, rank, say):
    """Every model encodes the split; every process scores its share of the shards not `done`
    (into `saved` as they finish). Returns rank 0's matrix (None elsewhere) and, with `each`
    (--plots of an ensemble), each model's own matrix."""
    todo = [k for k in range(len(shards)) if k not in done]
    encoded = []
    if todo or each:
        say("Computing results...")
        encoded = encode_scorers(scorers, rank)
    sims = None
    if rank == 0:
        sims = saved.sims if saved is not None else np.full(shape, np.nan)
    total = sum(matrix._pairs(s) for s in shards)
    bar = tqdm(total=total, initial=total - sum(matrix._pairs(shards[k]) for k in todo),
               unit="pair", unit_scale=True, desc="score", leave=False,
               disable=None if rank == 0 and todo else True)
    start = time.time()
    own = [np.full(shape, np.nan) for _ in scorers] if each and rank == 0 else None
    matrix.score_shards(encoded, shards, todo, sims, commit=saved.commit if saved else None,
                 bar=bar, each=each, own=own)
    bar.close()
    if each and done:  # shards an earlier run scored: each model's own scores for the plots
        matrix.score_shards(encoded, shards, sorted(done), None, each=each, own=own)
    if todo:
        say("calculate similarity time:", time.time() - start)
    elif saved is not None:  # rank 0's (the other processes hold no file)
        say("=> %s: every shard already scored (%s)" % (saved.path, saved.record.record_path))
    return sims, own


def draw_plots(out_dir, loaded, sims, own, each, fold5, split, say):
    """--plots: the figures of each model (`own`, or the one matrix) and of the ensemble's
    mean: {"plots": their paths, "plot_data": what they show}."""
    import plots as plotting
    paths = [p for _, _, p in loaded]
    curves = list(zip(model_labels(paths, [o for _, o, _ in loaded]),
                      [plot_data(m, fold5) for m in (own or [sims])]))
    if each:
        curves.append(("ensemble (mean)", plot_data(sims, fold5)))
    figures = plotting.evaluation_figures(curves, out_dir, "%s %s" % (loaded[0][1].data_name,
                                                                      split))
    say("plots: " + ", ".join(figures))
    return {"plots": figures, "plot_data": dict(curves)}


def _prepare(model_path, model_path2, data_path, split, fold5, vocab_path, data_name, device,
             feat_format, precision, say, overrides=None, check_flags=False):
    """Load the checkpoints and the split (every check before any compute): ([(model, opt,
    path)], [(model, opt, loader)], the first model's loader, matrix shape)."""
    loaded = []
    for path in [p for p in (model_path, model_path2) if p]:
        model, opt, vocab, ckpt = load_model(path, data_path, vocab_path, device, feat_format,
                                             data_name=data_name, precision=precision,
                                             overrides=overrides)
        say("=> loaded checkpoint_epoch {} of {}".format(ckpt.get("epoch"), path))
        loaded.append((model, opt, vocab, path))
    opt = loaded[0][1]
    unused = [type(m).vocab_path_unused for m, _, _, _ in loaded]
    if check_flags and vocab_path is not None and all(unused):
        raise errors.error("flag_unsupported", "--vocab_path %s" % vocab_path,
                           model=opt.module_name, why=unused[0])

    say("Loading dataset")
    # one loader per matcher class and vocabulary (two models of one class and vocabulary share
    # it): the captions are the same, in the same order, so the similarity matrices line up
    loaders, scorers = {}, []
    for model, mopt, vocab, _ in loaded:
        key = (type(model), tuple(sorted(getattr(vocab, "word2idx", {}).items())) or id(vocab))
        if key not in loaders:
            # the model's own options (a matcher's data may depend on them), the first model's
            # split; `fold5` too, for data that the original prepared differently per protocol
            mopt.data_name, mopt.fold5 = opt.data_name, fold5
            loaders[key] = get_test_loader(split, opt.data_name, vocab, mopt.batch_size,
                                           mopt.workers, mopt, matcher=type(model))
            if len(loaders) == 1:
                dset = loaders[key].dataset
                n_images = len(dset) // dset.im_div
                data.check_fold5(fold5, n_images, split, len(dset),
                                 needed=matrix.FOLDS * matrix.FOLD_IMAGES)
                data.check_eval_captions(n_images, len(dset), getattr(dset, "cap_path", split))
        scorers.append((model, mopt, loaders[key]))
    first = scorers[0][2].dataset
    shape = (-(-len(first) // first.im_div), len(first))
    return [(m, o, p) for m, o, _, p in loaded], scorers, scorers[0][2], shape


def split_asp(sims, tfidf, image_offset=0, caption_slice=None):
    """DAA's ASP metric (percent, i2t and t2i) of a similarity matrix, with the semantics of
    the split's captions (`tfidf`: daa.caption_tfidf of all the split's captions)."""
    sems = daa.split_semantics(tfidf, sims.shape[0], image_offset=image_offset,
                               captions=caption_slice)
    return daa.asp_metric(sims, sems)


def report(sims, fold5=False, captions=None, tfidf=None, log=print, recalls=None):
    """Print R@K both ways in the original's format (through `log`) and return them; with the
    split's `captions` (or their `tfidf`, daa.caption_tfidf), also DAA's ASP. `fold5`: the mean
    over the five 1000-image folds of a 5000-image split (COCO 1K). `recalls`: the (i2t, t2i)
    metrics of the split (or of each fold) when they are not those of ranking `sims`
    (two-stage retrieval); ASP is then printed only when `sims` is given."""
    if tfidf is None and captions is not None and sims is not None:
        tfidf = daa.caption_tfidf(captions)
    if not fold5:
        r, ri = recalls[0] if recalls else (i2t(None, None, None, sims),
                                            t2i(None, None, None, sims))
        rsum = _print_results(r, ri, log)
        out = {"i2t": r, "t2i": ri, "rsum": rsum, "sims": sims}
        if tfidf is not None:
            out["asp"] = split_asp(sims, tfidf)
            log("ASP: i2t %.1f t2i %.1f" % out["asp"])
        return out

    n = matrix.FOLD_IMAGES
    if recalls is None and sims.shape[0] != matrix.FOLDS * n:
        raise ValueError("--fold5 needs a split of %d images (COCO testall), got %d"
                         % (matrix.FOLDS * n, sims.shape[0]))
    results, asps = [], []
    for i in range(matrix.FOLDS):
        s = None if sims is None else sims[i * n:(i + 1) * n, 5 * i * n:5 * (i + 1) * n]
        r = recalls[i][0] if recalls else i2t(None, None, None, s)
        log("Image to text: %.1f, %.1f, %.1f, %.1f, %.1f" % r)
        ri = recalls[i][1] if recalls else t2i(None, None, None, s)
        log("Text to image: %.1f, %.1f, %.1f, %.1f, %.1f" % ri)
        ar = (r[0] + r[1] + r[2]) / 3
        ari = (ri[0] + ri[1] + ri[2]) / 3
        rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
        log("rsum: %.1f ar: %.1f ari: %.1f" % (rsum, ar, ari))
        results.append(list(r) + list(ri) + [ar, ari, rsum])
        if tfidf is not None:
            asps.append(split_asp(s, tfidf, image_offset=i * n,
                                  caption_slice=slice(5 * i * n, 5 * (i + 1) * n)))
            log("ASP: i2t %.1f t2i %.1f" % asps[-1])
    log("-----------------------------------")
    log("Mean metrics: ")
    mean = np.array(results).mean(axis=0)
    # the original prints 6 x the mean i2t recall here, labelled rsum; this is the real mean rsum
    rsum = _print_results(tuple(mean[:5]), tuple(mean[5:10]), log)
    out = {"i2t": tuple(mean[:5]), "t2i": tuple(mean[5:10]), "rsum": rsum, "sims": sims,
           "folds": results}
    if asps:
        out["asp"] = tuple(np.mean(asps, axis=0))
        log("ASP: i2t %.1f t2i %.1f" % out["asp"])
    return out


# ----------------------------------------------------------------------------- two stages

def check_two_stage(shortlist, rerank_k, plots, save_sims, overwrite):
    """The two-stage flags' checks, before any file is read: [K, ...] sorted (None without
    --shortlist)."""
    ks = None if rerank_k is None else sorted(
        {int(k) for k in ([rerank_k] if isinstance(rerank_k, int) else rerank_k)})
    if ks is not None and not shortlist:
        raise errors.error("rerank_needs_shortlist", "--rerank_k %s" % ",".join(map(str, ks)))
    if not shortlist:
        return None
    if ks is None:
        raise errors.error("shortlist_needs_k", "--shortlist %s" % shortlist)
    if ks[0] <= 0:
        raise errors.error("flag_positive", "--rerank_k %d" % ks[0])
    if plots:
        raise errors.error("flag_unsupported", "--plots", model="a two-stage evaluation",
                           why="its figures need the score of every pair")
    if save_sims:
        outputs.check_output_file(shortlist_file(save_sims), "--save_sims",
                                  made_by="evaluation.py --save_sims", overwrite=overwrite)
    return ks


def shortlist_file(save_sims):
    """Where a two-stage --save_sims keeps the shortlist (its candidates), beside the scores."""
    return matrix.sims_path(save_sims) + ".shortlist.npz"


def load_shortlist(path, scorers, shape, opts_):
    """The shortlist model and its loader of the split, refused unless it embeds alone and
    reads the re-ranker's images and captions."""
    model, opt, vocab, _ = load_model(path, opts_["data_path"], None, opts_["device"],
                                      opts_["feat_format"], data_name=opts_["data_name"],
                                      overrides=opts_["overrides"])
    where = "--shortlist %s" % path
    if not type(model).embeds_alone:
        raise errors.error("shortlist_unsupported", where, model=opt.module_name,
                           why=model.no_shortlist_why)
    ours = scorers[0][1]
    split = opts_["split"]
    if opt.data_name != ours.data_name:
        raise errors.error("shortlist_split", where, theirs="%s %s" % (opt.data_name, split),
                           ours="%s %s" % (ours.data_name, split))
    opt.fold5 = opts_["fold5"]
    loader = get_test_loader(split, opt.data_name, vocab, opt.batch_size, opt.workers, opt,
                             matcher=type(model))
    dset, first = loader.dataset, scorers[0][2].dataset
    if (-(-len(dset) // dset.im_div), len(dset)) != tuple(shape) or \
            list(dset.captions) != list(first.captions):
        raise errors.error("shortlist_split", where,
                           theirs="%d images and other captions" % -(-len(dset) // dset.im_div),
                           ours="%d images, %d captions" % tuple(shape))
    return model, opt, loader


def shortlist_candidates(model, loader, regions, kmax, rank):
    """Encode the split with the shortlist model and rank every region (twostage.
    shortlist_region): [found per region], seconds."""
    start = time.time()
    enc = encode_data(model, loader, img_stride=loader.dataset.im_div, progress=rank == 0)
    check_encoded(enc, model.opt.module_name, "the split (shortlist)")
    found = []
    for r0, r1, c0, c1 in regions:
        short = model.score(enc[0][r0:r1], enc[1][c0:c1], enc[2][c0:c1])
        found.append(twostage.shortlist_region(short, kmax))
    return found, time.time() - start


def two_stage(shortlist, ks, loaded, scorers, shape, saved, rank, say, opts_):
    """evalrank with --shortlist: the shortlist model's top max(ks) candidates of every query,
    the union of their pairs scored once by the re-ranker(s) (shared out under torchrun, kept
    in --save_sims), then one printed block per K (twostage.py). Rank 0 returns {K: results}
    and the shortlist's and the scoring's numbers."""
    fold5, kmax = opts_["fold5"], ks[-1]
    regions = matrix.score_regions(*shape, fold5=fold5)
    short_model, short_opt, short_loader = distributed.agree(
        lambda: load_shortlist(shortlist, scorers, shape, opts_))
    say("=> shortlist: %s (%s), top %s" % (shortlist, short_opt.module_name,
                                           ",".join(map(str, ks))))
    for k in ks:
        for direction, n, what in (("image to text", shape[1], "captions"),
                                   ("text to image", shape[0], "images")):
            gallery = n // (matrix.FOLDS if fold5 else 1)
            if k >= gallery and rank == 0:
                log.warning(errors.message("rerank_k_gallery", "--rerank_k %d" % k, k=k,
                                           direction=direction, n=gallery, items=what))

    def claim():
        if saved is None:
            return None
        ident = matrix.sims_identity([(m, o, p) for m, o, p in loaded],
                                     [dl.dataset for dl in dict.fromkeys(
                                         dl for _, _, dl in scorers)],
                                     opts_["split"], fold5, shape,
                                     matrix.shard_grid(regions), opts_["overrides"])
        ident.update({"two-stage": "pair scores", "shortlist sha256":
                      outputs.file_digest(shortlist), "rerank_k": ks})
        saved.claim_record(ident, info={"checkpoints": [p for _, _, p in loaded],
                                        "shortlist": shortlist, "command": " ".join(sys.argv)})
        return twostage.kept_shortlist(saved, shortlist_file(saved.path), len(regions))
    kept = distributed.agree(claim, master_only=True)

    def candidates():
        if kept is not None:
            return kept, 0.0
        found, seconds = shortlist_candidates(short_model, short_loader, regions, kmax, rank)
        if saved is not None:
            twostage.keep_shortlist(saved, shortlist_file(saved.path), found)
        return found, seconds
    found, short_time = distributed.agree(candidates, master_only=True)
    units = twostage.units_of(found, regions, ks, shape[1])
    done = distributed.agree(lambda: saved.open((units.n_pairs, 1), units.save_grid())
                             if saved is not None else set(), master_only=True)
    if saved is not None:
        errors.on_interrupt("the pairs of %s scored so far are saved" % saved.path,
                            "run the same command again: it continues from them")
    scores, score_time, n_scored = score_pairs(scorers, units, done, saved, rank)
    if rank != 0:
        return None
    say("Images: %d, Captions: %d" % shape)
    n_all = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in regions)
    timing = "time: shortlist %s, re-ranking %s" % (
        "read from %s" % shortlist_file(saved.path) if kept is not None else
        "%.1f s (encoding the split, scoring and sorting)" % short_time,
        "%.1f s (%d pairs, those of K = %s, each scored once)"
        % (score_time, units.n_pairs, ",".join(map(str, ks))) if n_scored else
        "every pair read from %s" % saved.path)
    results = {}
    for k in ks:
        results[k] = two_stage_block(found, regions, units, scores, k, n_all, shape, fold5,
                                     scorers, (shortlist, short_opt), loaded, say, timing)
    return {"rerank": results, "pairs": units.n_pairs, "all_pairs": n_all,
            "shortlist_time": short_time, "rerank_time": score_time,
            "rsum": results[kmax]["rsum"]}


def score_pairs(scorers, units, done, saved, rank):
    """The re-rankers' scores of the pairs of `units` (rank 0: the vector in unit order,
    --save_sims' memory map when given), scoring the units not `done`; and the seconds."""
    start = time.time()
    todo = [u for u in range(len(units)) if u not in done]
    encoded = encode_scorers(scorers, rank) if todo else []
    scores = None
    if rank == 0:
        scores = saved.sims[:, 0] if saved is not None else np.full(units.n_pairs, np.nan)
    bar = tqdm(total=units.n_pairs, initial=units.n_pairs - sum(units.size(u) for u in todo),
               unit="pair", unit_scale=True, desc="re-rank", leave=False,
               disable=None if rank == 0 and todo else True)

    def write(u, block):
        matrix.check_scores(block, *units.pairs(u), where="the pair scores")
        scores[units.start[u]:units.start[u + 1]] = block

    with matrix.quiet(encoded):
        matrix.deal(todo, units.size, lambda u: units.score(encoded, u), write,
                    saved.commit if saved is not None else None, bar)
    bar.close()
    return scores, time.time() - start, len(todo)


def two_stage_block(found, regions, units, scores, k, n_all, shape, fold5, scorers, short,
                    loaded, say, timing):
    """The printed block of one K, never mistaken for an exhaustive evaluation: what ranked,
    the pairs scored, the shortlist's recall ceiling and its own results, then the original's
    lines of the two-stage ranking."""
    n_pairs = units.n_at[k]
    n_img, n_cap = regions[0][1] - regions[0][0], regions[0][3] - regions[0][2]
    labels = model_labels([p for _, _, p in loaded], [o for _, o, _ in loaded])
    say("== two-stage evaluation, K = %d: shortlist %s (%s), re-ranked by %s"
        % (k, short[1].module_name, os.path.basename(short[0]), " + ".join(labels)))
    say(twostage.pairs_line(n_pairs, n_all, k, n_img, n_cap))
    ceil = np.mean([twostage.ceiling(f, k) for f in found], axis=0)
    say("recall ceiling (ground truth in the shortlist's top %d): i2t %.1f%%, t2i %.1f%%"
        % (k, ceil[0], ceil[1]))
    own = np.mean([f["own"] for f in found], axis=0)
    say("shortlist alone: rsum %.1f; i2t %.1f %.1f %.1f %.1f %.1f; t2i %.1f %.1f %.1f %.1f "
        "%.1f" % ((own[:3].sum() + own[5:8].sum(),) + tuple(own)))
    recalls = [tuple(m for m, _ in twostage.rerank_ranks(f, r, units, scores, k))
               for f, r in zip(found, regions)]
    sims = None
    if n_pairs == n_all:  # every pair re-ranked: the exhaustive matrix, and its ASP line
        sims = np.full(shape, np.nan)
        img, cap = units.keys // shape[1], units.keys % shape[1]
        sims[img, cap] = scores
    first = scorers[0][2].dataset
    out = report(sims, fold5, captions=first.captions[:shape[1]], recalls=recalls, log=say)
    out.update(k=k, pairs=n_pairs, ceiling=tuple(ceil), shortlist=tuple(own))
    say(timing)
    say("== end of the two-stage block, K = %d: %s" % (k, "the shortlist's candidates "
        "re-ranked, not an exhaustive evaluation" if n_pairs < n_all else "K covers the "
        "gallery, so every pair was re-ranked: the exhaustive ranking"))
    return out


def build_parser():
    """evaluation.py's flags; `.matcher_dests`: the matchers' evaluation flags among them."""
    p = errors.ArgumentParser(prog="evaluation.py",
                              description="Evaluate checkpoints of any matcher (R@K both ways)")
    p.add_argument("--model_path", default=DEFAULT_MODEL_PATH)
    p.add_argument("--model_path2", default=DEFAULT_MODEL_PATH2,
                   help="a second checkpoint: evaluate the ensemble (mean of similarities)")
    p.add_argument("--data_path", default=DEFAULT_DATA_PATH,
                   help="directory holding <data_name>/ (overrides the checkpoint's)")
    p.add_argument("--data_name", default=None, help="override the checkpoint's data_name")
    p.add_argument("--vocab_path", default=None, help="directory of <data_name>_vocab.json")
    p.add_argument("--split", default=DEFAULT_SPLIT, help="dev, test or testall")
    p.add_argument("--fold5", default=DEFAULT_FOLD5, action=argparse.BooleanOptionalAction,
                   help="COCO: average of five 1K folds of testall")
    p.add_argument("--save_sims", default=None,
                   help="write the similarity matrix (.npy) as it is scored, with a record of "
                        "the finished shards (FILE.npy.record); the same command continues an "
                        "interrupted run")
    p.add_argument("--overwrite", action="store_true",
                   help="with --save_sims: start afresh, replacing the file whatever it holds")
    p.add_argument("--device", default=None, help="cuda or cpu")
    p.add_argument("--feat_format", default=None, choices=["auto", "npy", "h5"],
                   help="read {split}_ims.npy or {split}.h5 (default: the checkpoint's, auto)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="similarity precision (default: the checkpoint's, fp32); bf16 autocast, "
                        "where the matcher supports it, is faster on GPUs and bf16 CPUs, and "
                        "moves the scores by ~1e-3")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also write score_distributions.png, recall_at_k.png (K = 1..100) and "
                        "rank_histogram.png there (an ensemble: each model and the ensemble)")
    p.add_argument("--shortlist", default=None, metavar="CKPT",
                   help="two-stage: a dual encoder's checkpoint shortlists each "
                        "query's --rerank_k best candidates, which the --model_path model(s) "
                        "re-rank (docs/two_stage.md)")
    p.add_argument("--rerank_k", default=None, type=twostage.parse_ks, metavar="K[,K...]",
                   help="with --shortlist: candidates re-ranked per query; several "
                        "(16,32,64,128) print one block each, scoring each pair once")
    p.matcher_dests = matchers.add_eval_options(p)
    return p


@errors.exit_on_error
def main(argv=None):
    p = build_parser()
    dests = p.matcher_dests
    args = p.parse_args(argv)
    rank = distributed.env()[1]
    logging.basicConfig(format="%(asctime)s %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING)
    evalrank(args.model_path, data_path=args.data_path, split=args.split, fold5=args.fold5,
             model_path2=args.model_path2, vocab_path=args.vocab_path,
             data_name=args.data_name, save_sims=args.save_sims, device=args.device,
             feat_format=args.feat_format, precision=args.precision,
             overrides={d: getattr(args, d) for d in dests if getattr(args, d) is not None},
             check_flags=True, overwrite=args.overwrite, plots=args.plots,
             shortlist=args.shortlist, rerank_k=args.rerank_k)


if __name__ == "__main__":
    sys.exit(main())
