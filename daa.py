"""DAA: the Differentiable ASP Approximation loss and the ASP metric.

Follows Li et al., "A Differentiable Semantic Metric Approximation in Probabilistic Embedding for
Cross-Modal Retrieval" (NeurIPS 2022) and its code (github.com/VL-Group/2022-NeurIPS-DAA:
`data.py` for the TF-IDF, `semantic.py` for the relevance matrix, `model.py` class `Loss` for the
loss, `evaluation.py` `ASP_compute` for the metric). Three parts:

1. Semantic relevance. TF-IDF over the split's caption lines (scikit-learn defaults). The
   relevance of image i to caption j is the mean, over the five ground-truth captions of i, of
   the TF-IDF dot product with caption j. Kept sparse; only the rows a batch needs are touched.
2. `DAALoss`: a smooth (sigmoid) rank of every image-caption pair under the model's scores and
   under the semantics, and ASP = mean of min(rank)/max(rank); loss = weight * (1 - ASP), once
   for i2t on (scores, sems) and once for t2i on their transposes.
3. `asp_metric`: the same ASP with exact ranks over a whole evaluation split, in percent.

Letters: B batch size (pair k is image k with caption k), N images, C = 5N captions, V vocab.
"""
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

__all__ = ["caption_tfidf", "batch_semantics", "split_semantics", "smooth_rank", "DAALoss",
           "asp_metric"]


# ----------------------------------------------------------------------------------------------
# Semantic relevance
# ----------------------------------------------------------------------------------------------

def caption_tfidf(captions):
    """TF-IDF rows of a split's captions: scipy CSR (C, V), float64, l2-normalised rows.

    `captions` are the lines of `<split>_caps.txt` (str or utf-8 bytes), in file order. The
    original strips each line and hands it to `CountVectorizer()` then `TfidfTransformer()`, both
    with default settings (lowercase, tokens of 2+ word characters, smooth idf, l2 rows); the
    strip cannot change the tokens but is kept. The original fits on the split it loads, after
    cutting the COCO dev split to its first 5000 lines: pass exactly those lines.
    """
    lines = [c.decode("utf-8").strip() if isinstance(c, bytes) else c.strip() for c in captions]
    counts = CountVectorizer().fit_transform(lines)      # (C, V) int counts
    return TfidfTransformer().fit_transform(counts).tocsr()  # (C, V) float64


CAPS_PER_IMAGE = 5  # SCAN/SGRAF data: captions 5i .. 5i+4 describe image i (hard-coded there)


def _gt_rows(img_ids, caps_per_image=CAPS_PER_IMAGE):
    """Caption rows of the images' ground truth: img*5 + k, k < 5, image-major: (N*5,)."""
    img_ids = np.asarray(img_ids, dtype=np.int64).reshape(-1)
    return (img_ids[:, None] * caps_per_image + np.arange(caps_per_image)[None, :]).reshape(-1)


def batch_semantics(tfidf, img_ids, cap_ids, im_div=5):
    """Relevance of each batch item's image to each batch caption: float32 tensor (B, B).

    sems[a, b] = mean_k <tfidf[5*g_a + k], tfidf[cap_ids[b]]>, k < 5, g_a = cap_ids[a] // 5.
    As in the original (`cider_compute` on each item's `sem_GT` and `sem_single` rows): the row
    side is the five ground-truth captions of item a's *image*, not item a's own caption; the
    column side is item b's own caption. The dot products are taken first, then averaged.
    The original finds the ground truth from the caption index (`idx2GT`: index // 5 * 5), never
    from the image index, so it works whether or not the feature file repeats each image; the same
    here. `img_ids` (the loader's `index // im_div`, `im_div` = 5 or 1 as in data.py) is only
    checked against `cap_ids` (pass None to skip). Only the 6B needed rows are read from the
    sparse TF-IDF; nothing of size (C, C) is built. Computed in float64, returned as float32
    (the original multiplies float32 copies of the rows).
    """
    cap_ids = np.asarray(cap_ids, dtype=np.int64).reshape(-1)
    if img_ids is not None and not np.array_equal(np.asarray(img_ids).reshape(-1),
                                                  cap_ids // im_div):
        raise ValueError("img_ids must be cap_ids // im_div (item k = image k // im_div, caption k)")
    gt = tfidf[_gt_rows(cap_ids // CAPS_PER_IMAGE)]                   # (B*5, V) sparse
    caps = tfidf[cap_ids]                                             # (B, V) sparse
    dots = (gt @ caps.T).toarray()                                    # (B*5, B)
    sems = dots.reshape(len(cap_ids), CAPS_PER_IMAGE, -1).mean(1)     # (B, B)
    return torch.from_numpy(sems.astype(np.float32))


def split_semantics(tfidf, n_images, im_div=CAPS_PER_IMAGE, image_offset=0, captions=None,
                    chunk=256):
    """Relevance of a split's images to its captions: float32 numpy array (N, C).

    im_div here is the number of captions per image (5, hard-coded in the original).
    sems[i, j] = mean_k <tfidf[(image_offset+i)*im_div + k], tfidf[j]>, k < im_div, for the images
    image_offset .. image_offset+n_images-1 and the caption columns `captions` (a slice or index
    array; default all rows of `tfidf`). This is the original's evaluation matrix (`encode_data`:
    `cider_compute_eval` then a mean over each image's five identical rows). For COCO 5-fold the
    original fits the TF-IDF on all 25000 test captions and slices fold f as images
    [1000f, 1000f+1000) x captions [5000f, 5000f+5000): pass image_offset=1000*f and
    captions=slice(5000*f, 5000*f+5000) with the full-split `tfidf`.
    The mean over the ground truth is applied to the TF-IDF rows first (the dot product is
    linear), and the product is done one chunk of images at a time against the sparse captions,
    so nothing larger than the (N, C) result is built. Computed in float64, returned as float32
    (the original's dtype).
    """
    cols = tfidf if captions is None else tfidf[captions]              # (C, V) sparse
    out = np.empty((n_images, cols.shape[0]), dtype=np.float32)
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        rows = _gt_rows(np.arange(image_offset + start, image_offset + stop), im_div)
        avg = sp.kron(sp.identity(stop - start, format="csr"),
                      np.full((1, im_div), 1.0 / im_div), format="csr")  # (n, n*5)
        gt_mean = (avg @ tfidf[rows]).toarray()                         # (n, V) dense
        out[start:stop] = (cols @ gt_mean.T).T                          # (n, C)
    return out


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def _soft_step(x, temperature):
    """sigmoid(x / temperature) with x / temperature clamped to [-50, 50] (no gradient outside)."""
    return torch.sigmoid(torch.clamp(x / temperature, -50.0, 50.0))


def smooth_rank(m, temperature=0.001, rowwise=False):
    """Smooth 1-based rank of every entry of a square matrix m (B, B): a (B, B) tensor.

    Default (the original's formula, index slip included):
        rank[b, c] = 1 + sum_{a != c} sigmoid((m[a, b] - m[b, c]) / T)
    i.e. entry m[b, c] is compared with column b of m, not with its own row b. The original
    builds m.unsqueeze(-1) - m[None] (B, B, B), masks a == c and sums over a. Its SmoothAP
    (switched off) uses m.t().unsqueeze(-1) there, which gives the row-wise form below: the
    missing .t() is the slip. Kept by default because the published numbers were trained with it.

    rowwise=True (each query ranks its own candidates):
        rank[a, b] = 1 + sum_{c != b} sigmoid((m[a, c] - m[a, b]) / T)
    """
    B = m.shape[0]
    off_diag = ~torch.eye(B, dtype=torch.bool, device=m.device)
    if rowwise:
        diff = m[:, None, :] - m[:, :, None]                  # (B, B, B): [a,b,c] = m[a,c] - m[a,b]
        steps = _soft_step(diff, temperature) * off_diag[None, :, :]    # drop c == b
        return steps.sum(2) + 1                               # (B, B)
    diff = m[:, :, None] - m[None, :, :]                      # (B, B, B): [a,b,c] = m[a,b] - m[b,c]
    steps = _soft_step(diff, temperature) * off_diag[:, None, :]        # drop a == c
    return steps.sum(0) + 1                                   # (B, B)


class DAALoss(nn.Module):
    """DAA loss terms (i2t, t2i) for a (B, B) score matrix and its (B, B) semantics.

    scores[i, j]: model score of image i with caption j (pair k = image k, caption k).
    sems[i, j]:   relevance of image i to caption j (`batch_semantics`), no gradient needed.
    ASP(S, M) = mean_{b,c} min(R_S[b,c], R_M[b,c]) / max(R_S[b,c], R_M[b,c]) with R = smooth_rank;
    i2t = daa_weight * (1 - ASP(scores, sems)); t2i = daa_weight * (1 - ASP(scores.T, sems.T)).
    The default is the original's column/row mixed rank (see `smooth_rank`), applied alike to
    scores and sems; it reproduces the original Loss's DAA terms to the last float32 bit on the
    fixture, and its gradient to float32 rounding (the original's total adds the summed
    max-violation hinge, `loss.py`). rowwise=True ranks within each query's row instead.
    """

    def __init__(self, daa_weight, temperature=0.001, rowwise=False):
        super().__init__()
        self.daa_weight = daa_weight
        self.temperature = temperature
        self.rowwise = rowwise

    def asp(self, scores, sems):
        """Smooth ASP of one direction: a scalar tensor in (0, 1]."""
        r_score = smooth_rank(scores, self.temperature, self.rowwise)  # (B, B)
        r_sem = smooth_rank(sems, self.temperature, self.rowwise)      # (B, B)
        ratio = torch.minimum(r_score, r_sem) / torch.maximum(r_score, r_sem)
        return ratio.sum() / scores.shape[0] ** 2

    def forward(self, scores, sems):
        sems = sems.to(scores.dtype)
        i2t = self.daa_weight * (1 - self.asp(scores, sems))
        t2i = self.daa_weight * (1 - self.asp(scores.t(), sems.t()))
        return i2t, t2i


# ----------------------------------------------------------------------------------------------
# The evaluation metric
# ----------------------------------------------------------------------------------------------

def _ordinal_ranks(x):
    """1-based descending ranks along the last axis; ties go to the lower index first."""
    order = np.argsort(-x, axis=1, kind="stable")             # (n, m)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, x.shape[1] + 1)[None, :], axis=1)
    return ranks


def _asp_rows(sims, sems, chunk):
    """Mean over rows of mean_j min(rank)/max(rank) with exact ranks within each row."""
    total = 0.0
    for start in range(0, sims.shape[0], chunk):
        r_sim = _ordinal_ranks(np.asarray(sims[start:start + chunk]))   # (n, m)
        r_sem = _ordinal_ranks(np.asarray(sems[start:start + chunk]))   # (n, m)
        ratio = np.minimum(r_sim, r_sem) / np.maximum(r_sim, r_sem)
        total += ratio.mean(1).sum()
    return total / sims.shape[0]


def asp_metric(sims, sems, chunk=256):
    """ASP of a whole split in percent: (asp_i2t, asp_t2i).

    sims (N, C): model scores of images x captions; sems (N, C): `split_semantics`.
    As the original `ASP_compute`: for each query row, the exact 1-based rank of every candidate
    (all of them, ground truth included) by descending score and by descending relevance
    (ordinal ranks from a double argsort, ties not averaged), the mean over candidates of
    min/max of the two ranks, the mean over queries, x100. i2t ranks each image's row over the
    C captions; t2i ranks each caption over the N images, on sims.T and sems.T. The original's
    order among exact ties is whatever torch.sort on its GPU gave; here ties go to the lower
    index first (a stable sort). Rows are processed `chunk` at a time.
    """
    sims = np.asarray(sims)
    sems = np.asarray(sems)
    if sims.shape != sems.shape:
        raise ValueError(f"sims {sims.shape} and sems {sems.shape} differ")
    asp_i2t = _asp_rows(sims, sems, chunk)
    asp_t2i = _asp_rows(sims.T, sems.T, chunk)
    return 100.0 * asp_i2t, 100.0 * asp_t2i
