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
With no flags it evaluates DEFAULT_MODEL_PATH on DEFAULT_DATA_PATH (edit them and run, as with
the original script).
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import checks
import daa
import matchers
import opts
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


# ----------------------------------------------------------------------------- encoding

class Encoded(tuple):
    """What `encode_data` returns: the original's (img_embs, cap_embs, cap_lens), and in
    `extra` the per-image and per-caption inputs that the matcher's scoring needs (its
    `score_inputs`), passed to `model.score` as keyword arguments."""

    def __new__(cls, img_embs, cap_embs, cap_lens, extra=None):
        self = super().__new__(cls, (img_embs, cap_embs, cap_lens))
        self.extra = extra or {}
        return self


def encode_data(model, data_loader, img_stride=1):
    """Embed every item of `data_loader` in eval mode.

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
    for batch in tqdm(data_loader, desc="encode", leave=False, disable=None):
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


# ----------------------------------------------------------------------------- similarity

def shard_attn_scores(model, img_embs, cap_embs, cap_lens, opt, shard_size=None):
    """The (n_images, n_captions) float64 similarity matrix, the original's name for the
    scoring: every matcher scores with its own `score` (the cross-attention ones shard by
    shard, `shard_size` as the original's 100, or None for shards sized by the memory
    available). `opt.precision` (e.g. bf16) applies where the matcher supports it."""
    model.opt.precision = getattr(opt, "precision", getattr(model.opt, "precision", "fp32"))
    return model.score(img_embs, cap_embs, cap_lens, shard_size=shard_size)


# ----------------------------------------------------------------------------- ranking

def _descending_positions(sims, chunk=256):
    """For each row, the position of every column in the order `np.argsort(row)[::-1]`
    (the original's order, ties included). Rows are sorted in chunks to bound memory."""
    n_rows, n_cols = sims.shape
    pos = np.empty((n_rows, n_cols), dtype=np.int32)
    cols = np.arange(n_cols - 1, -1, -1, dtype=np.int32)  # position of argsort index k
    for start in range(0, n_rows, chunk):
        order = np.argsort(sims[start:start + chunk], axis=1)   # ascending, like the original
        np.put_along_axis(pos[start:start + chunk], order, cols[None, :], axis=1)
    return pos


def _metrics(ranks):
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return r1, r5, r10, medr, meanr


def i2t(images, captions, caplens, sims, npts=None, return_ranks=False):
    """Image -> text (annotation). sims: (N, 5N). The rank of an image is the best rank of its
    five captions 5i..5i+4 in its row, in the original's descending order."""
    sims = np.asarray(sims)
    npts = sims.shape[0]
    pos = _descending_positions(sims)                              # (N, 5N)
    gt = 5 * np.arange(npts)[:, None] + np.arange(5)[None, :]      # (N, 5)
    ranks = np.take_along_axis(pos, gt, axis=1).min(1).astype(np.float64)
    top1 = np.argmax(pos == 0, axis=1).astype(np.float64)
    if return_ranks:
        return _metrics(ranks), (ranks, top1)
    return _metrics(ranks)


def t2i(images, captions, caplens, sims, npts=None, return_ranks=False):
    """Text -> image (search). The rank of caption j is the rank of image j // 5 in its column."""
    sims_t = np.ascontiguousarray(np.asarray(sims).T)              # (5N, N)
    npts = sims_t.shape[1]
    pos = _descending_positions(sims_t)
    ranks = pos[np.arange(5 * npts), np.arange(5 * npts) // 5].astype(np.float64)
    top1 = np.argmax(pos == 0, axis=1).astype(np.float64)
    if return_ranks:
        return _metrics(ranks), (ranks, top1)
    return _metrics(ranks)


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


def evalrank(model_path, data_path=None, split="dev", fold5=False, model_path2=None,
             vocab_path=None, data_name=None, save_sims=None, device=None, feat_format=None,
             precision=None, overrides=None, check_flags=False):
    """Evaluate a checkpoint (or the ensemble of two) on a split and print the original lines.
    `fold5=True`: COCO 5-fold 1K (the split must have 5000 images). `precision='bf16'` scores
    under bf16 autocast where the matcher supports it (faster where the hardware has bf16; not
    the original's numbers). `overrides`: the matchers' evaluation flags ({option: value}).
    `check_flags` (the command line): refuse a --vocab_path that no model reads. Returns a dict
    of results."""
    models = []
    for path in [p for p in (model_path, model_path2) if p]:
        model, opt, vocab, ckpt = load_model(path, data_path, vocab_path, device, feat_format,
                                             data_name=data_name, precision=precision,
                                             overrides=overrides)
        print("=> loaded checkpoint_epoch {} of {}".format(ckpt.get("epoch"), path))
        models.append((model, opt, vocab))
    opt = models[0][1]
    unused = [type(m).vocab_path_unused for m, _, _ in models]
    if check_flags and vocab_path is not None and all(unused):
        raise checks.error("flag_unsupported", "--vocab_path %s" % vocab_path,
                           model=opt.module_name, why=unused[0])

    print("Loading dataset")
    # one loader per matcher class and vocabulary (two models of one class and vocabulary share
    # it): the captions are the same, in the same order, so the similarity matrices line up
    loaders, sims = {}, None
    for model, mopt, vocab in models:
        key = (type(model), tuple(sorted(getattr(vocab, "word2idx", {}).items())) or id(vocab))
        if key not in loaders:
            # the model's own options (a matcher's data may depend on them), the first model's
            # split; `fold5` too, for data that the original prepared differently per protocol
            mopt.data_name, mopt.fold5 = opt.data_name, fold5
            loaders[key] = get_test_loader(split, opt.data_name, vocab, mopt.batch_size,
                                           mopt.workers, mopt, matcher=type(model))
            if len(loaders) == 1:
                dset = loaders[key].dataset
                checks.check_fold5(fold5, len(dset) // dset.im_div, split)
                print("Computing results...")
        data_loader = loaders[key]
        enc = encode_data(model, data_loader, img_stride=data_loader.dataset.im_div)
        start = time.time()
        s = model.score(*enc, **enc.extra)
        print("calculate similarity time:", time.time() - start)
        sims = s if sims is None else sims + s
    sims = sims / len(models)
    print("Images: %d, Captions: %d" % (sims.shape[0], sims.shape[1]))
    if save_sims:
        np.save(save_sims, sims)

    return report(sims, fold5, captions=data_loader.dataset.captions[:sims.shape[1]])


def split_asp(sims, tfidf, image_offset=0, caption_slice=None):
    """DAA's ASP metric (percent, i2t and t2i) of a similarity matrix, with the semantics of
    the split's captions (`tfidf`: daa.caption_tfidf of all the split's captions)."""
    sems = daa.split_semantics(tfidf, sims.shape[0], image_offset=image_offset,
                               captions=caption_slice)
    return daa.asp_metric(sims, sems)


def report(sims, fold5=False, captions=None, tfidf=None, log=print):
    """Print R@K both ways in the original's format (through `log`) and return them; with the
    split's `captions` (or their `tfidf`, daa.caption_tfidf), also DAA's ASP. `fold5`: the mean
    over the five 1000-image folds of a 5000-image split (COCO 1K)."""
    if tfidf is None and captions is not None:
        tfidf = daa.caption_tfidf(captions)
    if not fold5:
        r = i2t(None, None, None, sims)
        ri = t2i(None, None, None, sims)
        rsum = _print_results(r, ri, log)
        out = {"i2t": r, "t2i": ri, "rsum": rsum, "sims": sims}
        if tfidf is not None:
            out["asp"] = split_asp(sims, tfidf)
            log("ASP: i2t %.1f t2i %.1f" % out["asp"])
        return out

    if sims.shape[0] != 5000:
        raise ValueError("--fold5 needs a split of 5000 images (COCO testall), got %d"
                         % sims.shape[0])
    results, asps = [], []
    for i in range(5):
        s = sims[i * 1000:(i + 1) * 1000, i * 5000:(i + 1) * 5000]
        r = i2t(None, None, None, s)
        log("Image to text: %.1f, %.1f, %.1f, %.1f, %.1f" % r)
        ri = t2i(None, None, None, s)
        log("Text to image: %.1f, %.1f, %.1f, %.1f, %.1f" % ri)
        ar = (r[0] + r[1] + r[2]) / 3
        ari = (ri[0] + ri[1] + ri[2]) / 3
        rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
        log("rsum: %.1f ar: %.1f ari: %.1f" % (rsum, ar, ari))
        results.append(list(r) + list(ri) + [ar, ari, rsum])
        if tfidf is not None:
            asps.append(split_asp(s, tfidf, image_offset=i * 1000,
                                  caption_slice=slice(i * 5000, (i + 1) * 5000)))
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


@checks.exit_on_error
def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints of any matcher (R@K both ways)")
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
    p.add_argument("--save_sims", default=None, help="write the similarity matrix (.npy)")
    p.add_argument("--device", default=None, help="cuda or cpu")
    p.add_argument("--feat_format", default=None, choices=["auto", "npy", "h5"],
                   help="read {split}_ims.npy or {split}.h5 (default: the checkpoint's, auto)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="similarity precision (default: the checkpoint's, fp32); bf16 autocast, "
                        "where the matcher supports it, is faster on GPUs and bf16 CPUs, and "
                        "moves the scores by ~1e-3")
    dests = matchers.add_eval_options(p)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    evalrank(args.model_path, data_path=args.data_path, split=args.split, fold5=args.fold5,
             model_path2=args.model_path2, vocab_path=args.vocab_path,
             data_name=args.data_name, save_sims=args.save_sims, device=args.device,
             feat_format=args.feat_format, precision=args.precision,
             overrides={d: getattr(args, d) for d in dests if getattr(args, d) is not None},
             check_flags=True)


if __name__ == "__main__":
    sys.exit(main())
