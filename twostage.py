"""Two-stage retrieval: a dual encoder shortlists, a cross-attention matcher re-ranks.

A cross-attention matcher runs one network pass per (image, caption) pair: 5M on Flickr30K's
test split, 125M on COCO 5K. A dual encoder (`embeds_alone` in the contract) scores every pair
with one matrix product. Two stages, as ALBEF, BLIP and X-VLM
evaluate (k_test = 128 / 256): for every query, its K best candidates by the shortlist's score
are ordered by the re-ranker's score, followed by the rest of the gallery in the shortlist's
order. Every rank is defined, so R@1/5/10 and the median and mean rank are those of this
ranking; R@K past the shortlist cannot beat its recall ceiling (the share of queries whose
ground truth is in the shortlist's top K).

Here: the ranking rule (`shortlist_region`, `rerank_ranks`), the pairs to score (the union of
both directions' candidates, `union_pairs`, `units_of`), how they are scored (`PairUnits`: a
cell of the exhaustive evaluation's shard grid whole when most of it is shortlisted, else image
by image), the block's line of pairs (`pairs_line`) and the shortlist kept beside a --save_sims
file. evaluation.py runs it and prints the blocks (--shortlist, --rerank_k). Orders are the original evaluation's: `np.argsort(row)[::-1]`, ties included,
with the re-ranked candidates taken in gallery order, so that K >= the gallery gives the
exhaustive evaluation's ranks exactly.

Letters: N images, C = 5N captions, K candidates per query; i2t ranks captions for an image,
t2i images for a caption.
"""
import argparse
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import matrix
import outputs
import ranking

FOUND_KEYS = ("cand_i2t", "pos_i2t", "cand_t2i", "pos_t2i", "own")
DENSE = 0.5  # a cell of the shard grid is scored whole when this share of its pairs is needed
CHUNK = 256  # rows sorted at a time


def parse_ks(text):
    """--rerank_k's value: '16,32,64' -> [16, 32, 64] (sorted, unique). An argparse `type`:
    a value that is not a positive integer is its one-line error."""
    ks = []
    for part in str(text).split(","):
        try:
            k = int(part.strip())
        except ValueError:
            k = 0
        if k <= 0:
            raise argparse.ArgumentTypeError(
                "K must be a positive integer, or several separated by commas (16,32,64), "
                "not %r" % part.strip())
        ks.append(k)
    return sorted(set(ks))


# ----------------------------------------------------------------------------- the shortlist

def _shortlist_rows(short, k, gt):
    """For each row of `short` (n, m): its k best columns in the original's descending order
    (n, k), and the position in that order of its ground-truth columns `gt` (n, g)."""
    n = len(short)
    cand = np.empty((n, k), dtype=np.int32)
    gt_pos = np.empty(gt.shape, dtype=np.int32)
    for a in range(0, n, CHUNK):
        order = np.argsort(short[a:a + CHUNK], axis=1)           # ascending, as the original
        cand[a:a + CHUNK] = order[:, ::-1][:, :k]
        gt_pos[a:a + CHUNK] = np.take_along_axis(ranking.positions(order), gt[a:a + CHUNK],
                                                 axis=1)
    return cand, gt_pos


def ground_truth(n_img, n_cap):
    """(i2t, t2i): each image's caption columns (n_img, 5), each caption's image (n_cap, 1)."""
    per = n_cap // n_img
    i2t = per * np.arange(n_img)[:, None] + np.arange(per)[None, :]
    t2i = (np.arange(n_cap) // per)[:, None]
    return i2t, t2i


def shortlist_region(short, kmax):
    """What the ranking needs of the shortlist's scores `short` (n_img, n_cap) of a region
    (the split, or one fold of --fold5), for every K up to `kmax`: {"cand_i2t": (n_img, ki)
    caption columns, "cand_t2i": (n_cap, kt) image rows, each in the shortlist's order
    (ki, kt: kmax, at most the gallery), "pos_i2t" (n_img, 5) / "pos_t2i" (n_cap, 1): the
    ground truth's positions in it, "own": the shortlist's own R@1/5/10, medr, meanr both ways
    (its exhaustive evaluation)}."""
    short = np.asarray(short)
    n_img, n_cap = short.shape
    gt_i2t, gt_t2i = ground_truth(n_img, n_cap)
    cand_i2t, pos_i2t = _shortlist_rows(short, min(kmax, n_cap), gt_i2t)
    cand_t2i, pos_t2i = _shortlist_rows(np.ascontiguousarray(short.T), min(kmax, n_img),
                                        gt_t2i)
    own = np.array(list(ranking.metrics(pos_i2t.min(1).astype(np.float64))) +
                   list(ranking.metrics(pos_t2i[:, 0].astype(np.float64))))
    return {"cand_i2t": cand_i2t, "pos_i2t": pos_i2t, "cand_t2i": cand_t2i,
            "pos_t2i": pos_t2i, "own": own}


def ceiling(found, k):
    """The recall ceiling at K, percent, both ways: the share of queries whose ground truth is
    in the shortlist's top K (`found`: shortlist_region's dict)."""
    return (100.0 * np.mean(found["pos_i2t"].min(1) < k),
            100.0 * np.mean(found["pos_t2i"][:, 0] < k))


# ----------------------------------------------------------------------------- pairs

def region_pairs(found, region, k):
    """The global (image, caption) pairs of both directions' top k in a region, as keys
    image * n_cap + caption (n_cap: the split's captions), not unique."""
    i0, _, j0, _ = region
    ci, ct = found["cand_i2t"][:, :k], found["cand_t2i"][:, :k]
    img_a = np.repeat(np.arange(len(ci)), ci.shape[1]) + i0
    cap_a = ci.reshape(-1).astype(np.int64) + j0
    img_b = ct.reshape(-1).astype(np.int64) + i0
    cap_b = np.repeat(np.arange(len(ct)), ct.shape[1]) + j0
    return np.concatenate([img_a, img_b]), np.concatenate([cap_a, cap_b])


def union_pairs(founds, regions, k, n_cap):
    """The sorted unique keys (image * n_cap + caption) of every region's pairs at K = k."""
    keys = [i * n_cap + j for i, j in (region_pairs(f, r, k) for f, r in zip(founds, regions))]
    return np.unique(np.concatenate(keys))


def units_of(founds, regions, ks, n_cap):
    """The PairUnits of the largest K's pairs, in levels (PairUnits): the smallest K's pairs,
    then those each larger K adds, so that each pair is scored once and the smallest K's
    exactly as a run with that K alone."""
    keys, levels, seen, n_at = [], [], None, {}
    for level, k in enumerate(sorted(ks)):
        at = union_pairs(founds, regions, k, n_cap)
        new = at if seen is None else np.setdiff1d(at, seen, assume_unique=True)
        keys.append(new)
        levels.append(np.full(len(new), level, dtype=np.int64))
        seen, n_at[k] = at, len(at)
    keys, levels = np.concatenate(keys), np.concatenate(levels)
    order = np.argsort(keys, kind="stable")
    units = PairUnits(keys[order], regions, n_cap, levels[order])
    units.n_at = n_at  # each K's number of pairs
    return units


class PairUnits:
    """The pairs to score, cut into units of work: a cell of the exhaustive evaluation's shard
    grid (matrix.shard_grid) of which at least DENSE is shortlisted is a unit, scored whole (the
    exhaustive evaluation's very shard, so its scores to the bit); the other pairs of a block
    of the grid's images are a unit, scored image by image, each image against all its
    candidate captions at once (one call of ~K + 5K captions on a split of 5 captions per
    image), with what the re-ranker computes from an image alone or a caption alone
    (`gallery_inputs`, `caption_inputs`) computed once for the split. Those scores equal the
    cell's to float rounding (~1e-7). The pairs are kept in unit order (then image, then
    caption): unit u is keys[start[u]:start[u + 1]], so that a --save_sims file of pair scores
    is written unit by unit, as the matrix is shard by shard."""

    def __init__(self, keys, regions, n_cap, levels=None):
        """`keys`: the pairs (image * n_cap + caption), sorted. `levels`: with several K, the
        level of each pair (0: in the smallest K's union, 1: added by the next K, ...): each
        level is cut into units of its own, as if it were scored alone, so that the smallest
        K's pairs are scored exactly as a run with that K alone scores them."""
        self.n_cap = n_cap
        self.grid = matrix.shard_grid(regions)
        img, cap = keys // n_cap, keys % n_cap
        levels = np.zeros(len(keys), dtype=np.int64) if levels is None else levels
        cell = np.full(len(keys), -1, dtype=np.int64)
        row = np.full(len(keys), -1, dtype=np.int64)
        self.row_blocks = []
        base = 0
        for r0, r1, c0, c1 in regions:  # the cells of each region, in shard_grid's order
            rows = matrix._blocks(r0, r1, matrix.IMAGE_MIN, matrix.IMAGE_BLOCK)
            cols = matrix._blocks(c0, c1, matrix.CAPTION_MIN, matrix.CAPTION_BLOCK)
            inside = (img >= r0) & (img < r1) & (cap >= c0) & (cap < c1)
            bi = np.searchsorted([a for a, _ in rows], img[inside], side="right") - 1
            bj = np.searchsorted([a for a, _ in cols], cap[inside], side="right") - 1
            cell[inside] = base + bi * len(cols) + bj
            row[inside] = len(self.row_blocks) + bi
            self.row_blocks += rows
            base += len(rows) * len(cols)
        assert (cell >= 0).all(), "a shortlisted pair outside the scored regions"
        area = np.array([matrix._pairs(s) for s in self.grid])
        unit = np.empty(len(keys), dtype=np.int64)
        span = len(self.grid) + len(self.row_blocks)   # unit ids of one level
        for level in np.unique(levels):
            at = levels == level
            dense = np.bincount(cell[at], minlength=len(self.grid)) >= DENSE * area
            unit[at] = level * span + np.where(dense[cell[at]], cell[at],
                                               len(self.grid) + row[at])
        order = np.argsort(unit, kind="stable")       # keys are sorted: image, then caption
        self.keys, unit = keys[order], unit[order]
        self.units, self.start = np.unique(unit, return_index=True)
        self.start = np.append(self.start, len(self.keys))
        self.n_at = {}
        self._pre = self._sorted = None

    def __len__(self):
        return len(self.units)

    @property
    def n_pairs(self):
        return len(self.keys)

    def pairs(self, u):
        """Unit u's (images, captions), global indices."""
        keys = self.keys[self.start[u]:self.start[u + 1]]
        return keys // self.n_cap, keys % self.n_cap

    def size(self, u):
        return int(self.start[u + 1] - self.start[u])

    def whole(self, u):
        """The cell (i0, i1, j0, j1) unit u scores whole, or None (image by image)."""
        k = int(self.units[u]) % (len(self.grid) + len(self.row_blocks))
        return self.grid[k] if k < len(self.grid) else None

    def save_grid(self):
        """The units as a (n_pairs, 1) matrix's shards, for matrix.SavedSims."""
        return [(int(self.start[u]), int(self.start[u + 1]), 0, 1) for u in range(len(self))]

    def score(self, scorers, u):
        """Unit u's pair scores: the mean over the re-rankers (`scorers`: (model, encoded
        split)), as the exhaustive matrix."""
        img, cap = self.pairs(u)
        cell = self.whole(u)
        if cell is not None:
            i0, _, j0, _ = cell
            block, _ = matrix.score_shard(scorers, cell)
            return block[img - i0, cap - j0]
        pre = self.precomputed(scorers)
        lens = np.asarray(scorers[0][1][2])  # the first re-ranker's caption lengths
        out = np.empty(len(img))
        parts = np.split(np.arange(len(img)), np.flatnonzero(np.diff(img)) + 1)

        def one(part):  # its captions by length: blocks of one length are scored at once
            part = part[np.argsort(lens[cap[part]], kind="stable")]
            i = int(img[part[0]])
            return part, matrix.score_block(scorers, slice(i, i + 1), cap[part], pre)[0][0]
        # one image's pairs are small tensors, which one thread computes nearly as fast as
        # torch's threads together: as many images at once as threads, one thread each (the
        # same arithmetic whatever the number of threads or processes)
        threads = torch.get_num_threads()
        if threads > 1 and len(parts) > 1:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    for part, s in pool.map(one, parts):
                        out[part] = s
            finally:
                torch.set_num_threads(threads)
        else:
            for part in parts:
                out[part] = one(part)[1]
        return out

    def precomputed(self, scorers):
        """Each re-ranker's `gallery_inputs` and `caption_inputs` of the split, computed once
        (matrix.score_block's `precomputed`)."""
        key = [(id(model), id(enc)) for model, enc in scorers]
        if self._pre is None or self._pre[0] != key:
            self._pre = (key, [(model.gallery_inputs(enc[0]),
                                model.caption_inputs(enc[1], enc[2]))
                               for model, enc in scorers])
        return self._pre[1]

    def lookup(self, scores, img, cap):
        """The scores (pair vector, unit order) of the pairs (img, cap)."""
        if self._sorted is None:
            idx = np.argsort(self.keys)
            self._sorted = (self.keys[idx], idx)
        keys = np.asarray(img, dtype=np.int64) * self.n_cap + cap
        return scores[self._sorted[1][np.searchsorted(self._sorted[0], keys)]]


# ----------------------------------------------------------------------------- ranking

def _rerank(cand, rer, gt, gt_pos, k):
    """0-based ranks and top-1 of each query at K = k: cand (n, >= k) in the shortlist's order,
    rer their re-ranker scores, gt (n, g) the ground truth, gt_pos its shortlist positions."""
    c, s = cand[:, :k], rer[:, :k]
    perm = np.argsort(c, axis=1, kind="stable")     # the candidates in gallery order
    c = np.take_along_axis(c, perm, axis=1)
    pos = ranking.descending_positions(np.take_along_axis(s, perm, axis=1))   # (n, k)
    match = c[:, :, None] == gt[:, None, :]                                 # (n, k, g)
    inside = np.where(match, pos[:, :, None], np.iinfo(np.int32).max).min(1)
    ranks = np.where(match.any(1), inside, gt_pos).min(1).astype(np.float64)
    top1 = np.take_along_axis(c, np.argmax(pos == 0, axis=1)[:, None], axis=1)[:, 0]
    return ranks, top1.astype(np.float64)


def rerank_ranks(found, region, units, scores, k):
    """((i2t metrics, (ranks, top1)), (t2i metrics, (ranks, top1))) of a region at K = k, as
    ranking.i2t / t2i return them with return_ranks: the two-stage ranking."""
    i0, _, j0, _ = region
    gt_i2t, gt_t2i = ground_truth(len(found["cand_i2t"]), len(found["cand_t2i"]))
    out = []
    for cand, gt, pos, rows_are_images in ((found["cand_i2t"], gt_i2t, found["pos_i2t"], True),
                                           (found["cand_t2i"], gt_t2i, found["pos_t2i"], False)):
        kk = min(k, cand.shape[1])
        rows = np.arange(len(cand))[:, None]
        c = cand[:, :kk].astype(np.int64)
        img, cap = (rows + i0, c + j0) if rows_are_images else (c + i0, rows + j0)
        img, cap = np.broadcast_arrays(img, cap)
        rer = units.lookup(scores, img.reshape(-1), cap.reshape(-1)).reshape(len(cand), kk)
        ranks, top1 = _rerank(c, rer, gt, pos, kk)
        out.append((ranking.metrics(ranks), (ranks, top1)))
    return out


# ----------------------------------------------------------------------------- printing

def pairs_line(n_pairs, n_all, k, n_img, n_cap):
    return ("pairs scored: %d of %d (%.2f%%): the union of each image's top %d captions and "
            "each caption's top %d images" % (n_pairs, n_all, 100.0 * n_pairs / max(n_all, 1),
                                             min(k, n_cap), min(k, n_img)))


# ----------------------------------------------------------------------------- --save_sims

def kept_shortlist(saved, path, n_regions):
    """The candidates that an earlier run of the evaluation of `saved` (a claimed matrix.
    SavedSims of pair scores) kept in `path`, when its record's checksum says the file is as
    written; else None."""
    sums = [e["attached"] for e in saved.record.entries
            if isinstance(e, dict) and set(e) == {"attached"}]
    if not sums or not os.path.isfile(path):
        return None
    size, crc = outputs.file_crc32(path)
    if sums[-1] != {"size": size, "crc32": crc}:
        return None
    with np.load(path) as f:
        return [{k: f["%d_%s" % (r, k)] for k in FOUND_KEYS} for r in range(n_regions)]


def keep_shortlist(saved, path, found):
    """Write the candidates (`found`, one dict per region) to `path`, atomically, and their
    checksum to the record of `saved`: a rerun reads them instead of encoding the split."""
    sums = {}
    with outputs.atomic_output(path, saved.record.header["made_by"]) as tmp:
        buf = io.BytesIO()  # a zip file is written with seeks: whole, then summed
        np.savez(buf, **{"%d_%s" % (r, k): v for r, d in enumerate(found) for k, v in d.items()})
        with open(tmp, "wb") as f:
            summed = outputs.Summed(f)
            summed.write(buf.getbuffer())
        sums.update(summed.sums)
    saved.record.append({"attached": sums})
