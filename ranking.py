"""Ranking: the ground truth's rank in each row of a similarity matrix, and R@1/5/10, median and
mean rank, as the originals' `i2t` and `t2i` compute them (evaluation.py exposes both under
their original names). Apart from evaluation.py so that two-stage retrieval (twostage.py) and
the search server rank with the same code, with no import of the evaluation's models and data.

Letters: N images, 5N captions (caption j belongs to image j // 5).
"""
import numpy as np


def positions(order, out=None):
    """For rows sorted ascending (`order`: their np.argsort), the position of every column in
    the original's descending order, `np.argsort(row)[::-1]` (into `out` when given)."""
    out = np.empty(order.shape, dtype=np.int32) if out is None else out
    cols = np.arange(order.shape[1] - 1, -1, -1, dtype=np.int32)  # position of argsort index k
    np.put_along_axis(out, order, cols[None, :], axis=1)
    return out


def descending_positions(sims, chunk=256):
    """For each row, the position of every column in the order `np.argsort(row)[::-1]`
    (the original's order, ties included). Rows are sorted in chunks to bound memory."""
    sims = np.asarray(sims)
    pos = np.empty(sims.shape, dtype=np.int32)
    for start in range(0, len(sims), chunk):
        order = np.argsort(sims[start:start + chunk], axis=1)   # ascending, like the original
        positions(order, out=pos[start:start + chunk])
    return pos


def metrics(ranks):
    """(R@1, R@5, R@10, median rank, mean rank) of 0-based ranks, the original's expressions."""
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
    pos = descending_positions(sims)                               # (N, 5N)
    gt = 5 * np.arange(npts)[:, None] + np.arange(5)[None, :]      # (N, 5)
    ranks = np.take_along_axis(pos, gt, axis=1).min(1).astype(np.float64)
    top1 = np.argmax(pos == 0, axis=1).astype(np.float64)
    if return_ranks:
        return metrics(ranks), (ranks, top1)
    return metrics(ranks)


def t2i(images, captions, caplens, sims, npts=None, return_ranks=False):
    """Text -> image (search). The rank of caption j is the rank of image j // 5 in its column."""
    sims_t = np.ascontiguousarray(np.asarray(sims).T)              # (5N, N)
    npts = sims_t.shape[1]
    pos = descending_positions(sims_t)
    ranks = pos[np.arange(5 * npts), np.arange(5 * npts) // 5].astype(np.float64)
    top1 = np.argmax(pos == 0, axis=1).astype(np.float64)
    if return_ranks:
        return metrics(ranks), (ranks, top1)
    return metrics(ranks)
