"""Evaluation: encode a split, score every (image, caption) pair, and report R@K both ways.

Follows the original SGRAF `evaluation.py`: the same functions (`encode_data`,
`shard_attn_scores`, `i2t`, `t2i`, `evalrank`) and the same printed lines, for Flickr30K 1K
test, COCO 5-fold 1K (`--fold5`) and COCO full 5K (`--split testall`), and the SGR+SAF ensemble
("SGRAF": the mean of two models' similarity matrices).

NAAF checkpoints (ours or the authors', naaf.py) are recognised by their contents, with no
flag: the model is rebuilt with the threshold state saved in their `opt`, and with the vocab
that matches their text encoder (SCAN's `<data_name>_vocab.json` for `basic`, the GloVe
`naaf/<data_name>.json` for `GloVe`). Any two checkpoints make an ensemble (NAAF+NAAF,
SGR+NAAF, ...): each model encodes the split with its own vocab, and the similarity matrices
are averaged.

    python evaluation.py --model_path runs/f30k_precomp_SGR/checkpoint/model_best.pth.tar \
        --data_path data --split test
    python evaluation.py --model_path SGR.pth.tar --model_path2 SAF.pth.tar --split test
    python evaluation.py --model_path NAAF.pth.tar --model_path2 SGR.pth.tar --split test
With no flags it evaluates DEFAULT_MODEL_PATH on DEFAULT_DATA_PATH (edit them and run, as with
the original script).
"""
import argparse
import logging
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import checks
import daa
import naaf
from checkpoint import load_checkpoint
from data import get_test_loader
from meters import AverageMeter, LogCollector  # noqa: F401  (the original exposes them here)
from model import SGRAF, build_model  # noqa: F401  (SGRAF: the name this module exposed)

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = "runs/f30k_precomp_SGR/checkpoint/model_best.pth.tar"
DEFAULT_MODEL_PATH2 = None  # set to a second checkpoint to evaluate the ensemble
DEFAULT_DATA_PATH = "data"
DEFAULT_SPLIT = "test"
DEFAULT_FOLD5 = False


# ----------------------------------------------------------------------------- encoding

def encode_data(model, data_loader, log_step=10, logging=print, img_stride=1):
    """Embed every item of `data_loader` in eval mode.

    Returns img_embs (N, R, d), cap_embs (N, max_len, d) zero padded, cap_lens (N,), in the
    dataset's order, as float32 (the original keeps float64 copies of float32 values; the
    values are the same). With `img_stride=k` only the image embeddings of items 0, k, 2k, ...
    are kept (the evaluation keeps every 5th image anyway), which saves 4/5 of the memory.
    """
    model.val_start()
    n = len(data_loader.dataset)
    img_embs, cap_parts, cap_lens = None, [None] * n, np.zeros(n, dtype=np.int64)
    for images, captions, lengths, ids in tqdm(data_loader, desc="encode", leave=False,
                                               disable=None):
        with torch.no_grad():
            img_emb, cap_emb, _ = model.forward_emb(images, captions, lengths)
        img_emb = img_emb.float().cpu().numpy()
        cap_emb = cap_emb.float().cpu().numpy()
        if img_embs is None:
            img_embs = np.zeros(((n + img_stride - 1) // img_stride,) + img_emb.shape[1:],
                                dtype=np.float32)
        for j, nid in enumerate(ids):
            if nid % img_stride == 0:
                img_embs[nid // img_stride] = img_emb[j]
            cap_parts[nid] = cap_emb[j, :lengths[j]]
            cap_lens[nid] = lengths[j]
    max_n_word = int(cap_lens.max())
    cap_embs = np.zeros((n, max_n_word, cap_parts[0].shape[-1]), dtype=np.float32)
    for k, part in enumerate(cap_parts):
        cap_embs[k, :len(part)] = part
    return img_embs, cap_embs, cap_lens.tolist()


# ----------------------------------------------------------------------------- similarity

def _memory_budget():
    """Bytes the scoring may use for one shard: an eighth of the available memory, kept
    between 16 MB and 64 MB, so that the peak stays below the per-caption path's (the result
    matrix is the caller's, outside this budget)."""
    avail = 2 ** 31
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(max(avail // 8, 2 ** 24), 2 ** 26)


def shard_attn_scores(model, img_embs, cap_embs, cap_lens, opt, shard_size=None):
    """The (n_images, n_captions) similarity matrix, float64 as the original, scored shard by
    shard and written into the result as each shard is done.

    `shard_size` given: shards of shard_size images x shard_size captions (the original's
    100). None: the shard sizes follow the memory available (`_memory_budget`); the peak does
    not grow with the number of images or captions. The image global vectors are computed once
    per image shard, the caption ones once per caption shard (kept when they are small).
    `opt.precision == 'bf16'` scores under bf16 autocast (CUDA, or CPUs with bf16)."""
    device = getattr(model, "device", torch.device("cpu"))
    sim_enc = model.sim_enc
    n_im, n_cap = len(img_embs), len(cap_embs)
    sims = np.zeros((n_im, n_cap))
    if n_im == 0 or n_cap == 0:
        return sims
    r, d = img_embs.shape[1], img_embs.shape[2]
    if shard_size:
        im_shard = cap_shard = int(shard_size)
    else:
        budget = _memory_budget()
        # per image: the regions and VisualSA's temporaries; per caption: its words, a
        # length-block copy, the score columns
        im_shard = max(1, min(n_im, budget // 2 // (4 * r * d * 4)))
        cap_shard = max(1, min(n_cap, budget // 2 // (cap_embs.shape[1] * d * 4 * 2 +
                                                       im_shard * 4 * 2)))
    keep_cap_glo = n_cap * d * 4 <= 2 ** 27
    cap_glo_cache = {}
    bf16 = getattr(opt, "precision", "fp32") == "bf16"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    shards = [(i, j) for i in range(0, n_im, im_shard) for j in range(0, n_cap, cap_shard)]
    img_glo, img_at = None, None
    for i, j in tqdm(shards, desc="shard_attn_scores", leave=False, disable=None):
        im_end, ca_end = min(i + im_shard, n_im), min(j + cap_shard, n_cap)
        lens = cap_lens[j:ca_end]
        with torch.no_grad(), amp:
            im = torch.from_numpy(np.asarray(img_embs[i:im_end], dtype=np.float32)).to(device)
            ca = torch.from_numpy(np.ascontiguousarray(cap_embs[j:ca_end, :max(lens)],
                                                       dtype=np.float32)).to(device)
            if img_at != i:
                img_glo, img_at = sim_enc.image_globals(im), i
            cap_glo = cap_glo_cache.get(j)
            if cap_glo is None:
                cap_glo = sim_enc.caption_globals(ca, lens)
                if keep_cap_glo:
                    cap_glo_cache[j] = cap_glo
            sim = sim_enc(im, ca, lens, img_glo=img_glo, cap_glo=cap_glo)
        sims[i:im_end, j:ca_end] = sim.float().cpu().numpy()
    return sims


def score_all(model, img_embs, cap_embs, cap_lens, opt, shard_size=None):
    """The (n_images, n_captions) float64 similarity matrix of any matcher: NAAF scores every
    pair itself (at its fixed test threshold `opt.thres_safe`, in memory-bounded blocks);
    SGR/SAF go through shard_attn_scores."""
    if getattr(opt, "module_name", None) == "NAAF":
        model.val_start()
        sims = model.forward_sim(img_embs, cap_embs, cap_lens)
        return sims.cpu().numpy() if torch.is_tensor(sims) else np.asarray(sims)
    return shard_attn_scores(model, img_embs, cap_embs, cap_lens, opt, shard_size=shard_size)


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

def complete_opt(opt):
    """Options missing from an (older, or the original's) checkpoint get today's defaults."""
    import opts
    defaults = vars(opts.build_parser().parse_args([]))
    for k, v in defaults.items():
        if not hasattr(opt, k):
            setattr(opt, k, v)
    return opt


def model_vocab(opt):
    """(vocab, path): the vocabulary the model of `opt` reads, from `opt.vocab_path`: SCAN's
    `<data_name>_vocab.json`, or for NAAF naaf.naaf_vocab_file's choice (the GloVe vocab for
    its GloVe text encoder)."""
    if opt.module_name == "NAAF":
        path = naaf.naaf_vocab_file(opt, opt.vocab_path)
        return checks.load_vocab(path, loader=naaf.load_naaf_vocab), path
    path = os.path.join(opt.vocab_path, "%s_vocab.json" % opt.data_name)
    return checks.load_vocab(path), path


def load_model(model_path, data_path=None, vocab_path=None, device=None, feat_format=None,
               data_name=None, precision=None):
    """A model (SGRAF, or NAAF for a NAAF checkpoint) and its vocabulary from a checkpoint
    (ours or the authors')."""
    checkpoint = load_checkpoint(model_path)
    opt = complete_opt(checkpoint["opt"])
    if naaf.is_naaf_checkpoint(checkpoint):  # the original's opt has no module_name
        opt.module_name = "NAAF"
        naaf.complete_naaf_opt(opt)
    if data_name is not None:
        opt.data_name = data_name
    if data_path is not None:
        opt.data_path = data_path
    if feat_format is not None:
        opt.feat_format = feat_format
    if precision is not None:
        opt.precision = precision
    if vocab_path is not None:
        opt.vocab_path = vocab_path
    elif not os.path.isdir(opt.vocab_path):  # the authors' absolute paths
        opt.vocab_path = "vocab"
    opt.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab, vocab_file = model_vocab(opt)
    opt.vocab_size = len(vocab)
    model = build_model(opt)
    checks.check_checkpoint_matches(model, checkpoint, model_path, vocab_file)
    model.load_state_dict(checkpoint["model"])
    return model, opt, vocab, checkpoint


def _print_results(r, ri):
    ar = (r[0] + r[1] + r[2]) / 3
    ari = (ri[0] + ri[1] + ri[2]) / 3
    rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
    print("rsum: %.1f" % rsum)
    print("Average i2t Recall: %.1f" % ar)
    print("Image to text: %.1f %.1f %.1f %.1f %.1f" % tuple(r))
    print("Average t2i Recall: %.1f" % ari)
    print("Text to image: %.1f %.1f %.1f %.1f %.1f" % tuple(ri))
    return rsum


def compute_sims(models, data_loader, shard_size=None):
    """The similarity matrix of a split for one model or the mean over several (ensemble),
    with every 5th image (the loader repeats each image for its captions)."""
    sims, img_embs, cap_lens = None, None, None
    for model, opt in models:
        img_embs, cap_embs, cap_lens = encode_data(model, data_loader,
                                                   img_stride=data_loader.dataset.im_div)
        start = time.time()
        s = score_all(model, img_embs, cap_embs, cap_lens, opt, shard_size=shard_size)
        print("calculate similarity time:", time.time() - start)
        sims = s if sims is None else sims + s
    return sims / len(models), img_embs, cap_lens


def evalrank(model_path, data_path=None, split="dev", fold5=False, model_path2=None,
             vocab_path=None, data_name=None, save_sims=None, device=None, feat_format=None,
             precision=None):
    """Evaluate a checkpoint (or the ensemble of two) on a split and print the original lines.
    `fold5=True`: COCO 5-fold 1K (the split must have 5000 images). `precision='bf16'` scores
    SGR/SAF under bf16 autocast (faster where the hardware has bf16; not the original's
    numbers). Returns a dict of results."""
    models = []
    for path in [p for p in (model_path, model_path2) if p]:
        model, opt, vocab, ckpt = load_model(path, data_path, vocab_path, device, feat_format,
                                             data_name=data_name, precision=precision)
        print("=> loaded checkpoint_epoch {} of {}".format(ckpt.get("epoch"), path))
        models.append((model, opt, vocab))
    opt = models[0][1]

    print("Loading dataset")
    # one loader per vocabulary (e.g. SGR's SCAN vocab and NAAF's GloVe one in an ensemble):
    # the captions are the same, in the same order, so the similarity matrices line up
    loaders, sims = [], None
    for model, mopt, vocab in models:
        same = [dl for v, dl in loaders if v.word2idx == vocab.word2idx]
        data_loader = same[0] if same else get_test_loader(
            split, opt.data_name, vocab, opt.batch_size, opt.workers, opt)
        if not loaders:
            checks.check_fold5(fold5, len(data_loader.dataset) // data_loader.dataset.im_div,
                               split)
            print("Computing results...")
        if not same:
            loaders.append((vocab, data_loader))
        s, img_embs, cap_lens = compute_sims([(model, mopt)], data_loader)
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


def report(sims, fold5=False, captions=None):
    """Print R@K both ways in the original's format and return them; with the split's
    `captions`, also DAA's ASP. `fold5`: the mean over the five 1000-image folds of a
    5000-image split (COCO 1K)."""
    tfidf = daa.caption_tfidf(captions) if captions is not None else None
    if not fold5:
        r = i2t(None, None, None, sims)
        ri = t2i(None, None, None, sims)
        rsum = _print_results(r, ri)
        out = {"i2t": r, "t2i": ri, "rsum": rsum, "sims": sims}
        if tfidf is not None:
            out["asp"] = split_asp(sims, tfidf)
            print("ASP: i2t %.1f t2i %.1f" % out["asp"])
        return out

    if sims.shape[0] != 5000:
        raise ValueError("--fold5 needs a split of 5000 images (COCO testall), got %d"
                         % sims.shape[0])
    results, asps = [], []
    for i in range(5):
        s = sims[i * 1000:(i + 1) * 1000, i * 5000:(i + 1) * 5000]
        r = i2t(None, None, None, s)
        print("Image to text: %.1f, %.1f, %.1f, %.1f, %.1f" % r)
        ri = t2i(None, None, None, s)
        print("Text to image: %.1f, %.1f, %.1f, %.1f, %.1f" % ri)
        ar = (r[0] + r[1] + r[2]) / 3
        ari = (ri[0] + ri[1] + ri[2]) / 3
        rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
        print("rsum: %.1f ar: %.1f ari: %.1f" % (rsum, ar, ari))
        results.append(list(r) + list(ri) + [ar, ari, rsum])
        if tfidf is not None:
            asps.append(split_asp(s, tfidf, image_offset=i * 1000,
                                  caption_slice=slice(i * 5000, (i + 1) * 5000)))
            print("ASP: i2t %.1f t2i %.1f" % asps[-1])
    print("-----------------------------------")
    print("Mean metrics: ")
    mean = np.array(results).mean(axis=0)
    # the original prints 6 x the mean i2t recall here, labelled rsum; this is the real mean rsum
    rsum = _print_results(tuple(mean[:5]), tuple(mean[5:10]))
    out = {"i2t": tuple(mean[:5]), "t2i": tuple(mean[5:10]), "rsum": rsum, "sims": sims,
           "folds": results}
    if asps:
        out["asp"] = tuple(np.mean(asps, axis=0))
        print("ASP: i2t %.1f t2i %.1f" % out["asp"])
    return out


@checks.exit_on_error
def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate SGRAF checkpoints (R@K both ways)")
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
                   help="SGR/SAF similarity precision (default: the checkpoint's, fp32); bf16 "
                        "autocast is faster on GPUs and bf16 CPUs, and moves the scores by "
                        "~1e-3")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    evalrank(args.model_path, data_path=args.data_path, split=args.split, fold5=args.fold5,
             model_path2=args.model_path2, vocab_path=args.vocab_path,
             data_name=args.data_name, save_sims=args.save_sims, device=args.device,
             feat_format=args.feat_format, precision=args.precision)


if __name__ == "__main__":
    sys.exit(main())
