"""GSMN: the Graph Structured Matching Network for image-text matching.

Liu, Mao, Zhang, Xie, Wang, Zhang, "Graph Structured Network for Image-Text Matching", CVPR 2020,
following the original code (CrossmodalGroup/GSMN, HEAD dcc0f61: `model.py`, `graph_model.py`,
`layers.py`, `data.py`) formula by formula. Every parameter name is the original's, so the
authors' checkpoints (`'model'` = [img_enc, txt_enc, i2t_match_G, t2i_match_G] state dicts, the
heads in old-style weight norm `weight_g`/`weight_v`) load strictly and give the same scores.

What the released code computes (spec gsmn.md, section 2.3), for one (image, caption) pair:
  node matching  SCAN attention both ways (i2t: each region attends to the words; t2i: each
                 word attends to the regions), then per node the cosines of its num_block
                 contiguous chunks with the chunks of its attended context: a (num_block,)
                 "matching vector" m per region and per word;
  visual graph   Gaussian kernels on the box-centre pseudo-coordinates, normalised over the 8
                 KERNELS, applied to each region's OWN vector repeated over its neighbours: so
                 h_i = concat_k W_k (S_ik m_i), S_ik = sum_j w_ijk, a per-region MLP with a
                 geometry gain per kernel (no neighbour information flows);
  textual graph  word-word attention (dense) or dependency arcs (sparse), normalised over the
                 neighbours, again applied to the node's own vector: h_l = concat_k W_k (g_l m_l)
                 + b_k with g_l = 1 (dense, and sparse unless an arc is a self-loop), so dense
                 and sparse score alike and the kernel parameters cancel;
  heads          out_2(tanh(out_1(h))) per node, weight-normed Linears, mean over the nodes;
  score          visual-graph score + textual-graph score.
`--gsmn_propagate` builds the graphs as the paper describes them instead (neighbour vectors,
visual kernels normalised over the neighbours): a deliberate deviation, not the released numbers.

Read top to bottom:
  boxes        box_centres, pseudo_coordinates, inplace_divided (the original loader's in-place
               division, reproduced), original_eval_counts, normalised_boxes
  arcs         arc_adjacency (the sparse word graph), validate_arcs
  input files  read_precaps, load_sizes (a pickled object array read without running code),
               load_boxes, load_depends: the optional files, with one-line errors
  modules      WeightNormLinear, ImageQueryGraphConvolution, TextQueryGraphConvolution,
               VisualGraph, TextualGraph: the original layers; each graph's `forward` is the
               original per-caption loop op for op (the test oracle, at the original's speed)
  fast path    gsmn_scores: many images x many captions, both directions, exact algebra
  data         GSMNDataset (--bbox_mode), collate_fn (the batch's boxes and arcs)
  wrapper      GSMN (contract.Matcher): flags, checkpoint recognition, encoders, both graphs,
               the hinge loss, Adam, the train step, score; retrieve.py's query and attention

Letters in shape comments: B images, C captions, R regions (36), L words, d embed_size,
n num_block (chunks), q = d / n (chunk size), K kernels (8), h hid_dim.
"""
import argparse
import codecs
import importlib
import json
import logging
import os
import pickle
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import errors
from contract import (Matcher, bench_opt, fp32, l2norm, memory_budget, random_batch,
                      random_embeddings)
from loss import ContrastiveLoss
from model import EncoderImage, EncoderText
from vocab import encode_caption

log = logging.getLogger(__name__)

N_KERNELS = 8        # Gaussian kernels of both graph convolutions (hard-coded in the original)
COS_EPS = 1e-8       # cosine_similarity: x.y / max(|x||y|, eps)
BLOCK_ELEMS = 2 ** 21  # fast path: elements of its largest intermediate, (n, Bi, R, Cb, L)


# ----------------------------------------------------------------------------- boxes

def box_centres(bbox):
    """(B, R, 4) x1, y1, x2, y2 -> (B, R, 2) centres, as the original: x1 + 0.5 (x2 - x1)."""
    bb_size = bbox[:, :, 2:] - bbox[:, :, :2]
    return bbox[:, :, :2] + 0.5 * bb_size


def pseudo_coordinates(bbox):
    """Polar pseudo-coordinates of every region pair: (B, R, 4) -> (B, R, R, 2) (rho, theta),
    delta = c_i - c_j, theta = atan2(delta_x, delta_y) (the original's argument order)."""
    c = box_centres(bbox)
    R = c.size(1)
    delta = c.view(-1, R, 1, 2) - c.view(-1, 1, R, 2)                  # (B, R, R, 2)
    rho = torch.sqrt(delta[:, :, :, 0] ** 2 + delta[:, :, :, 1] ** 2)
    theta = torch.atan2(delta[:, :, :, 0], delta[:, :, :, 1])
    return torch.cat((rho.unsqueeze(-1), theta.unsqueeze(-1)), dim=-1)


def inplace_divided(boxes, sizes, count):
    """Boxes as the original loader leaves them after dividing them in place `count` times:
    its `__getitem__` divides x by image_w and y by image_h at EVERY access, in the array's own
    dtype (numpy in place). boxes (N, R, 4) pixels, sizes (N, 2) (w, h), count (N,) ints.
    Returns a new array of boxes' dtype. A float32 array underflows to exact 0 after about 17
    divisions by a few hundred, a float64 one after about 120."""
    boxes = np.array(boxes)
    div = np.asarray(sizes, dtype=np.float64)[:, [0, 1, 0, 1]]         # (N, 4)
    count = np.broadcast_to(np.asarray(count, dtype=np.int64), (len(boxes),))
    for k in range(int(count.max(initial=0))):
        rows = count > k
        if not rows.any():
            break
        # numpy divides a float32 scalar by a float64 one in float64 and stores the rounded
        # float32: the same value as a float32 division (both correctly rounded)
        boxes[rows] = (boxes[rows] / div[rows][:, None, :]).astype(boxes.dtype)
    return boxes


def normalised_boxes(boxes, sizes):
    """Boxes divided once by their image's width and height: what the original meant to feed."""
    return inplace_divided(boxes, sizes, 1)


def original_eval_counts(n_captions, im_div, batch_size, memory_shared=True):
    """How many times the original's evalrank has divided the boxes of each caption row when
    it collects them: `encode_data` reads the test loader twice (the first pass only measures
    the captions), each read divides the row's image once more, and with a float32 box file
    `torch.Tensor(array)` shares memory with the array, so every row of an image in a batch
    shows the count after the batch's last access (a float64 file is copied at each access).
    Returns (n_captions,) int64."""
    n = np.arange(n_captions)
    first_pass = np.minimum(im_div, n_captions - (n // im_div) * im_div)  # reads of the image
    if memory_shared:
        batch_end = np.minimum((n // batch_size + 1) * batch_size, n_captions)
        second = np.clip(batch_end - (n // im_div) * im_div, 0, im_div)
    else:
        second = n % im_div + 1
    return (first_pass + second).astype(np.int64)


# ----------------------------------------------------------------------------- arcs

def arc_adjacency(dep, L):
    """The sparse word graph of one caption, as the original's build_sparse_graph: arcs
    [governor, dependent] (1-based, item 0 the ROOT arc, skipped), symmetrised, arcs with an
    index >= L dropped, plus the identity. (L, L) float32."""
    adj = np.zeros((L, L), dtype=np.int64)
    for i, pair in enumerate(dep or ()):
        if i == 0 or pair[0] >= L or pair[1] >= L:
            continue
        adj[pair[0], pair[1]] = 1
        adj[pair[1], pair[0]] = 1
    return torch.from_numpy(adj + np.eye(L, dtype=np.int64)).float()


def validate_arcs(depends, n_captions, path):
    """Problems of a `{split}_caps.json` dependency file, or None: a list of one arc list per
    caption, each arc two non-negative integers. Returns a one-line reason."""
    if not isinstance(depends, list):
        return "expected a JSON list (one arc list per caption), got %s" % type(depends).__name__
    if len(depends) != n_captions:
        return "%d arc lists for %d captions" % (len(depends), n_captions)
    for i, arcs in enumerate(depends):
        if not isinstance(arcs, list):
            return "line %d: expected a list of [governor, dependent] pairs" % (i + 1)
        for pair in arcs:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
                return "line %d: %r is not a [governor, dependent] pair of integers" % (
                    i + 1, pair)
            if pair[0] < 0 or pair[1] < 0:
                return "line %d: arc %r has a negative (out-of-range) index" % (i + 1, pair)
    return None


# ----------------------------------------------------------------------------- input files

NO_IDS = "then the split's _caps.txt is tokenised"
NO_BOXES = "then zero boxes, as the original's in-place division leaves"
NO_ARCS = "sparse GSMN scores the same without it"


def read_precaps(path, n_captions, vocab_size):
    """`{split}_precaps_stan.txt`: one caption per line as comma-separated word ids
    (<start> ... <end>, the authors' Stanford tokenisation mapped to the SCAN vocabulary).
    Returns a list of int lists; the line count must be the caption count."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()
    if len(lines) != n_captions:
        raise errors.error("input_count", path, found="%d lines" % len(lines), n=n_captions,
                           items="captions", item="caption", without=NO_IDS)
    out = []
    for i, line in enumerate(lines):
        try:
            ids = [int(t) for t in line.strip().split(b",")]
        except ValueError:
            raise errors.error("input_invalid", path, what="line %d is not comma-separated word "
                               "ids: %r" % (i + 1, line[:40].decode("latin1")),
                               fix="use the authors' file, or delete it (%s)" % NO_IDS) from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise errors.error("input_invalid", path, what="line %d has word id %d, outside the "
                               "vocabulary's %d words" % (i + 1, bad[0], vocab_size),
                               fix="pass the vocabulary the ids were made with (--vocab_path, "
                                   "--data_name), or delete the file (%s)" % NO_IDS)
        out.append(ids)
    return out


_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_mod, "_reconstruct")] = np.ndarray.__reduce__(np.empty(0))[0]
    _NUMPY_GLOBALS[(_mod, "scalar")] = np.int64(0).__reduce__()[0]


class _SizesUnpickler(pickle.Unpickler):
    """Unpickles an object array of numbers and dicts and nothing else: the globals a numpy
    object array and numpy scalars need, no other callable (so nothing in the file runs)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        raise pickle.UnpicklingError("refused global %s.%s" % (module, name))


def _number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def load_sizes(path, n_images):
    """`{split}_ims_size.npy`: per image {'image_w', 'image_h'} (a pickled object array; read
    without running pickled code), or a numeric (N, 2) array of (w, h). Returns (N, 2)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                    np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            if dtype.hasobject:
                arr = _SizesUnpickler(f, encoding="latin1").load()
            else:
                arr = None
        if arr is None:
            arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise errors.error("input_invalid", path, what="not a readable image size file (%s)"
                           % errors.first_line(e), fix="use the authors' file, or delete it "
                           "and the box file (%s)" % NO_BOXES) from None
    if isinstance(arr, np.ndarray) and arr.dtype != object:
        if arr.shape != (n_images, 2):
            raise errors.error("input_shape", path, what="image sizes", shape=arr.shape,
                               expected="(%d, 2), (w, h) for each image" % n_images,
                               without=NO_BOXES)
        sizes = arr.astype(np.float64)
    else:
        if not isinstance(arr, np.ndarray) or arr.ndim != 1:
            raise errors.error("input_shape", path, what="image sizes",
                               shape=getattr(arr, "shape", "?"),
                               expected="(%d,) {'image_w', 'image_h'} dicts" % n_images,
                               without=NO_BOXES)
        if len(arr) != n_images:
            raise errors.error("input_count", path, found="%d image sizes" % len(arr),
                               n=n_images, items="images", item="image", without=NO_BOXES)
        sizes = np.zeros((n_images, 2))
        for i, d in enumerate(arr):
            if not (isinstance(d, dict) and _number(d.get("image_w")) and
                    _number(d.get("image_h")) and all(_number(v) for v in d.values())):
                raise errors.error("input_invalid", path, what="entry %d is not {'image_w': "
                                   "number, 'image_h': number}" % i,
                                   fix="use the authors' file, or delete it and the box file "
                                       "(%s)" % NO_BOXES)
            sizes[i] = d["image_w"], d["image_h"]
    if not (sizes > 0).all():
        i = int(np.argmin((sizes > 0).all(1)))
        raise errors.error("input_invalid", path, what="image %d has size %s"
                           % (i, sizes[i].tolist()),
                           fix="use the authors' file, or delete it and the box file (%s)"
                               % NO_BOXES)
    return sizes


def load_boxes(path, n_images, n_regions):
    """`{split}_ims_bbx.npy`: (N, R, 4) boxes x1, y1, x2, y2 in pixels, one row per image of
    the split (not memory-mapped: the original divides them in place)."""
    try:
        boxes = np.load(path, allow_pickle=False)
    except Exception as e:
        raise errors.error("input_invalid", path, what="not a readable box file (%s)"
                           % errors.first_line(e), fix="use the authors' file, or delete it "
                           "and the size file (%s)" % NO_BOXES) from None
    if boxes.ndim != 3 or boxes.shape[1:] != (n_regions, 4):
        raise errors.error("input_shape", path, what="boxes", shape=boxes.shape,
                           expected="(%d, %d, 4): x1, y1, x2, y2 of each region of each image"
                                    % (n_images, n_regions), without=NO_BOXES)
    if len(boxes) != n_images:
        raise errors.error("input_count", path, found="boxes of %d images" % len(boxes),
                           n=n_images, items="images", item="image", without=NO_BOXES)
    if not (np.issubdtype(boxes.dtype, np.floating) or np.issubdtype(boxes.dtype, np.integer)):
        raise errors.error("input_invalid", path, what="boxes of dtype %s" % boxes.dtype,
                           fix="use the authors' file, or delete it and the size file (%s)"
                               % NO_BOXES)
    return boxes


def load_depends(path, n_captions):
    """`{split}_caps.json`: one list of [governor, dependent] arcs per caption."""
    fix = ("use the file the original's dependency_parser.py wrote for this split, or delete "
           "it (%s)" % NO_ARCS)
    try:
        with open(path, encoding="utf-8") as f:
            depends = json.load(f)
    except Exception as e:
        raise errors.error("input_invalid", path, what="not a readable JSON file (%s)"
                           % errors.first_line(e), fix=fix) from None
    if isinstance(depends, list) and len(depends) != n_captions:
        raise errors.error("input_count", path, found="%d arc lists" % len(depends),
                           n=n_captions, items="captions", item="caption", without=NO_ARCS)
    problem = validate_arcs(depends, n_captions, path)
    if problem:
        raise errors.error("input_invalid", path, what=problem, fix=fix)
    return depends


# ----------------------------------------------------------------------------- modules

class WeightNormLinear(nn.Module):
    """A Linear under the old `torch.nn.utils.weight_norm` (dim 0): weight = g v / ||v|| row by
    row, stored as `bias`, `weight_g` (out, 1), `weight_v` (out, in) in that order (the
    original's state-dict keys and Adam order). Initialised as nn.Linear, then g = ||w||."""

    def __init__(self, in_features, out_features):
        super().__init__()
        lin = nn.Linear(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(lin.bias.data.clone())
        self.weight_g = nn.Parameter(lin.weight.data.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(lin.weight.data.clone())

    @property
    def weight(self):
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ImageQueryGraphConvolution(nn.Module):
    """The visual graph convolution (Monti et al.'s Gaussian mixture model kernels on polar
    pseudo-coordinates): K kernels, each a bias-free Linear(in, out // K)."""

    def __init__(self, in_feat_dim, out_feat_dim, n_kernels, coordinate_dim, bias=False):
        super().__init__()
        self.n_kernels = n_kernels
        self.coordinate_dim = coordinate_dim
        self.in_feat_dim, self.out_feat_dim = in_feat_dim, out_feat_dim
        self.conv_weights = nn.ModuleList([nn.Linear(in_feat_dim, out_feat_dim // n_kernels,
                                                     bias=bias) for _ in range(n_kernels)])
        self.mean_rho = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0, 1.0))
        self.mean_theta = nn.Parameter(torch.empty(n_kernels, 1).uniform_(-np.pi, np.pi))
        self.precision_rho = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))
        self.precision_theta = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))

    def gaussian_weights(self, pseudo_coord, over_neighbours=False):
        """(B, R, R, 2) -> (B*R*R, K): each pair's kernel weights, NaN set to 0, then
        normalised over the KERNELS as the original (so 0/0 stays NaN); or, with
        over_neighbours (--gsmn_propagate), over each node's neighbours."""
        diff = (pseudo_coord[:, :, :, 0].contiguous().view(-1, 1) -
                self.mean_rho.view(1, -1)) ** 2
        weights_rho = torch.exp(-0.5 * diff / (1e-14 + self.precision_rho.view(1, -1) ** 2))
        first_angle = torch.abs(pseudo_coord[:, :, :, 1].contiguous().view(-1, 1) -
                                self.mean_theta.view(1, -1))
        second_angle = torch.abs(2 * np.pi - first_angle)
        weights_theta = torch.exp(-0.5 * (torch.min(first_angle, second_angle) ** 2) /
                                  (1e-14 + self.precision_theta.view(1, -1) ** 2))
        weights = weights_rho * weights_theta
        weights[(weights != weights).detach()] = 0
        if over_neighbours:
            R = pseudo_coord.size(2)
            w = weights.view(-1, R, self.n_kernels)
            return (w / torch.sum(w, dim=1, keepdim=True)).view(-1, self.n_kernels)
        return weights / torch.sum(weights, dim=1, keepdim=True)

    def forward(self, neighbourhood_features, neighbourhood_pseudo_coord, over_neighbours=False):
        """(B, R, R, in) features of each node's neighbourhood, (B, R, R, 2) -> (B, R, out)."""
        batch_size, K, nbh = neighbourhood_features.shape[:3]
        weights = self.gaussian_weights(neighbourhood_pseudo_coord, over_neighbours)
        weights = weights.view(batch_size * K, nbh, self.n_kernels)
        features = neighbourhood_features.view(batch_size * K, nbh, -1)
        return convolution(self.conv_weights, features, weights).view(-1, K, self.out_feat_dim)


class TextQueryGraphConvolution(nn.Module):
    """The textual graph convolution: one scalar `params` per kernel scales the given neighbour
    weights, which are then normalised over the neighbours (so it cancels). The original builds
    it with `bias` as its 4th positional argument set to 2: its Linears HAVE biases."""

    def __init__(self, in_feat_dim, out_feat_dim, n_kernels, bias=True):
        super().__init__()
        self.n_kernels = n_kernels
        self.in_feat_dim, self.out_feat_dim = in_feat_dim, out_feat_dim
        self.conv_weights = nn.ModuleList([nn.Linear(in_feat_dim, out_feat_dim // n_kernels,
                                                     bias=bool(bias)) for _ in range(n_kernels)])
        self.params = nn.Parameter(torch.empty(n_kernels, 1).uniform_(-1.0, 1.0))

    def forward(self, neighbourhood_features, neighbourhood_weights):
        """(B, L, L, in), (B, L, L, 1) -> (B, L, out)."""
        batch_size, K, nbh = neighbourhood_features.shape[:3]
        n_word = neighbourhood_weights.size(1)
        weights = neighbourhood_weights.view(-1, 1) * self.params.view(1, -1)
        weights = weights.view(neighbourhood_weights.size(0) * n_word, n_word, -1)
        weights = weights / torch.sum(weights, dim=1, keepdim=True)   # over the neighbours
        weights = weights.view(batch_size * K, nbh, self.n_kernels)
        features = neighbourhood_features.view(batch_size * K, nbh, -1)
        return convolution(self.conv_weights, features, weights).view(-1, K, self.out_feat_dim)


def convolution(conv_weights, neighbourhood, weights):
    """The patch operator and the per-kernel Linears: (N, nbh, in), (N, nbh, K) -> (N, out)."""
    weighted = torch.bmm(weights.transpose(1, 2), neighbourhood)        # (N, K, in)
    parts = [conv_weights[i](weighted[:, i]) for i in range(len(conv_weights))]
    return torch.cat([p.unsqueeze(1) for p in parts], dim=1).view(weighted.size(0), -1)


def cosine_similarity(x1, x2, dim=-1, eps=COS_EPS):
    """x1.x2 / max(|x1| |x2|, eps) along dim. The original squeezes the result, which drops the
    image axis of a one-image shard and crashes; this does not."""
    w12 = torch.sum(x1 * x2, dim)
    w1 = torch.norm(x1, 2, dim)
    w2 = torch.norm(x2, 2, dim)
    return w12 / (w1 * w2).clamp(min=eps)


def inter_relations(K, Q, xlambda):
    """SCAN attention of each query node over the source nodes: scores K Q^T, LeakyReLU(0.1),
    l2-normalised over the QUERIES, softmax over the sources. K (B, S, d), Q (B, T, d) ->
    (B, T, S)."""
    batch_size, queryL, sourceL = Q.size(0), Q.size(1), K.size(1)
    attn = torch.bmm(K, torch.transpose(Q, 1, 2))                       # (B, S, T)
    attn = F.leaky_relu(attn, 0.1)
    attn = l2norm(attn, 2)
    attn = torch.transpose(attn, 1, 2).contiguous().view(batch_size * queryL, sourceL)
    attn = torch.softmax(attn * xlambda, dim=1)
    return attn.view(batch_size, queryL, sourceL)


def intra_relations(K, Q, xlambda):
    """Word-word attention softmax_j(lambda w_i.w_j): (B, L, d) -> (B, L, L)."""
    batch_size, KL = K.size(0), K.size(1)
    attn = torch.bmm(Q, torch.transpose(K, 1, 2).contiguous())
    attn = torch.softmax(attn.view(batch_size * KL, KL) * xlambda, dim=1)
    return attn.view(batch_size, KL, KL)


def matching_vectors(query, context, n_block):
    """Multi-block cosine of query nodes with their attended contexts: split d into chunks of
    n_block dimensions (the original's name for the chunk SIZE, d // num_block), stacked as
    the original does. (B, N, d) x (B, N, d) -> (B, N, d // n_block)."""
    qry_set = torch.stack(torch.split(query, n_block, dim=2), dim=2)
    ctx_set = torch.stack(torch.split(context, n_block, dim=2), dim=2)
    return cosine_similarity(qry_set, ctx_set, dim=-1)


class VisualGraph(nn.Module):
    """Regions query the words; the region graph and its head (i2t_match_G)."""

    def __init__(self, feat_dim, hid_dim, out_dim, dropout=0.5, n_kernels=N_KERNELS):
        super().__init__()  # `dropout` is accepted, as the original, and used nowhere
        self.feat_dim, self.out_dim = feat_dim, out_dim
        self.graph_convolution_1 = ImageQueryGraphConvolution(feat_dim, hid_dim, n_kernels, 2)
        self.out_1 = WeightNormLinear(hid_dim, hid_dim)
        self.out_2 = WeightNormLinear(hid_dim, out_dim)

    def node_level_matching(self, tnodes, vnodes, n_block, xlambda):
        attn = inter_relations(tnodes, vnodes, xlambda)                 # (B, R, L) over words
        weighted = torch.bmm(torch.transpose(tnodes, 1, 2), torch.transpose(attn, 1, 2))
        return matching_vectors(vnodes, torch.transpose(weighted, 1, 2), n_block)  # (B, R, n)

    def structure_level_matching(self, vnode_mvector, pseudo_coord, propagate=False):
        batch, n_region = vnode_mvector.size(0), vnode_mvector.size(1)
        if propagate:   # neighbour j's vector at [i, j] (the paper)
            neighbor_image = vnode_mvector.unsqueeze(1).repeat(1, n_region, 1, 1)
        else:           # the node's own vector at every [i, j] (the released code)
            neighbor_image = vnode_mvector.unsqueeze(2).repeat(1, 1, n_region, 1)
        hidden = self.graph_convolution_1(neighbor_image, pseudo_coord, propagate)
        hidden = hidden.view(batch * n_region, -1)
        sim = self.out_2(self.out_1(hidden).tanh())
        return sim.view(batch, -1).mean(dim=1, keepdim=True)            # (B, 1)

    def forward(self, images, captions, bbox, cap_lens, lambda_softmax, num_block,
                propagate=False):
        """The original per-caption loop: (B, R, d) images with (B, R, 4) boxes x (C, L, d)
        captions -> (B, C)."""
        n_block = captions.size(2) // num_block
        n_image, n_caption = images.size(0), captions.size(0)
        pseudo_coord = pseudo_coordinates(bbox)
        similarities = []
        for i in range(n_caption):
            n_word = int(cap_lens[i])
            cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous()
            cap_i_expand = cap_i.repeat(n_image, 1, 1)                  # (B, L, d)
            vnode_mvector = self.node_level_matching(cap_i_expand, images, n_block,
                                                     lambda_softmax)
            similarities.append(self.structure_level_matching(vnode_mvector, pseudo_coord,
                                                              propagate))
        return torch.cat(similarities, 1)


class TextualGraph(nn.Module):
    """Words query the regions; the word graph and its head (t2i_match_G)."""

    def __init__(self, feat_dim, hid_dim, out_dim, dropout=0.5, n_kernels=N_KERNELS):
        super().__init__()
        self.feat_dim, self.out_dim = feat_dim, out_dim
        # the original passes 2 (meant as a coordinate dim) into `bias`: biases on
        self.graph_convolution_3 = TextQueryGraphConvolution(feat_dim, hid_dim, n_kernels, 2)
        self.out_1 = WeightNormLinear(hid_dim, hid_dim)
        self.out_2 = WeightNormLinear(hid_dim, out_dim)

    def node_level_matching(self, vnodes, tnodes, n_block, xlambda):
        attn = inter_relations(vnodes, tnodes, xlambda)                 # (B, L, R) over regions
        weighted = torch.bmm(torch.transpose(vnodes, 1, 2), torch.transpose(attn, 1, 2))
        return matching_vectors(tnodes, torch.transpose(weighted, 1, 2), n_block)  # (B, L, n)

    def structure_level_matching(self, tnode_mvector, intra_relation, depends, is_sparse,
                                 propagate=False):
        batch, n_word = tnode_mvector.size(0), tnode_mvector.size(1)
        node = tnode_mvector.unsqueeze(1) if propagate else tnode_mvector.unsqueeze(2)
        if not is_sparse:
            neighbor_nodes = node.repeat(1, n_word, 1, 1) if propagate else \
                node.repeat(1, 1, n_word, 1)
            neighbor_weights = intra_relation.repeat(batch, 1, 1, 1)
        else:
            adj = arc_adjacency(depends, n_word).to(tnode_mvector.device, tnode_mvector.dtype)
            adj = adj.view(n_word, n_word).unsqueeze(0).unsqueeze(-1)   # (1, L, L, 1)
            neighbor_nodes = adj * node                                 # (B, L, L, n)
            neighbor_weights = l2norm(adj * intra_relation, dim=2).repeat(batch, 1, 1, 1)
        hidden = self.graph_convolution_3(neighbor_nodes, neighbor_weights)
        hidden = hidden.view(batch * n_word, -1)
        sim = self.out_2(self.out_1(hidden).tanh())
        return sim.view(batch, -1).mean(dim=1, keepdim=True)            # (B, 1)

    def forward(self, images, captions, depends, cap_lens, lambda_softmax, num_block,
                is_sparse=False, propagate=False):
        """The original per-caption loop: (B, R, d) x (C, L, d) captions with their arc lists
        (sparse) -> (B, C)."""
        n_block = captions.size(2) // num_block
        n_image, n_caption = images.size(0), captions.size(0)
        similarities = []
        for i in range(n_caption):
            n_word = int(cap_lens[i])
            cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous()
            cap_i_expand = cap_i.repeat(n_image, 1, 1)
            words_sim = intra_relations(cap_i, cap_i, lambda_softmax).unsqueeze(-1)
            nodes_sim = self.node_level_matching(images, cap_i_expand, n_block, lambda_softmax)
            dep = None if depends is None else depends[i]
            similarities.append(self.structure_level_matching(nodes_sim, words_sim, dep,
                                                              is_sparse, propagate))
        return torch.cat(similarities, 1)


# ----------------------------------------------------------------------------- fast path

def chunk_gram(x, n):
    """Per-chunk Gram matrices: (N, M, d) -> (N, n, M, M), [., b, i, j] = x_i^(b) . x_j^(b)."""
    N, M, d = x.shape
    xb = x.view(N, M, n, d // n).transpose(1, 2).reshape(N * n, M, d // n)
    return torch.bmm(xb, xb.transpose(1, 2)).view(N, n, M, M)


def chunk_norms(x, n):
    """(N, M, d) -> (N, M, n): the 2-norm of each chunk."""
    N, M, d = x.shape
    return torch.linalg.vector_norm(x.view(N, M, n, d // n), dim=-1)


def visual_head_matrices(vgraph, gains):
    """The visual graph's conv and out_1, folded per region: the released conv is
    h = concat_k S_k W_k m with no bias, so out_1(h) = V1 diag(S) Wc m + b1. gains (Bi, R, K)
    -> (Bi*R, n, h), so that out_1's input-to-output map of region r is m @ M[r]."""
    conv = vgraph.graph_convolution_1
    Wc = torch.cat([w.weight for w in conv.conv_weights], 0)           # (h, n), kernel-major
    o = Wc.size(0) // conv.n_kernels
    s = gains.reshape(-1, conv.n_kernels).repeat_interleave(o, dim=1)  # (Bi*R, h)
    return torch.matmul((s.unsqueeze(2) * Wc).transpose(1, 2), vgraph.out_1.weight.t())


def visual_gains(vgraph, boxes, propagate=False):
    """From the boxes (Bi, R, 4): the per-kernel gains S (Bi, R, K), S_ik = sum_j w_ijk with w
    normalised over the kernels (the released code); or, with propagate, the neighbour weights
    (Bi, R, R, K) normalised over the neighbours."""
    conv = vgraph.graph_convolution_1
    Bi, R = boxes.shape[:2]
    w = conv.gaussian_weights(pseudo_coordinates(boxes), over_neighbours=propagate)
    w = w.view(Bi, R, R, conv.n_kernels)
    return w if propagate else w.sum(2)


def textual_mixing(cap_emb, L, lambda_softmax, is_sparse, depends=None):
    """Each caption's neighbour map P (Cb, L, L) of the textual convolution with the kernel
    parameter cancelled: the conv's input at word i is sum_j P_ij x_ij where x_ij is m_i (the
    released code) or m_j (--gsmn_propagate). Dense: P = softmax_j(lambda w_i.w_j); sparse:
    P = A * adj / sum_j (A * adj) * adj with A that attention and adj the arc graph (the
    original's l2norm of A * adj cancels in the normalisation)."""
    a = intra_relations(cap_emb, cap_emb, lambda_softmax)              # (Cb, L, L)
    if not is_sparse:
        return a
    adj = torch.stack([arc_adjacency(None if depends is None else depends[c], L)
                       for c in range(cap_emb.size(0))]).to(a.device, a.dtype)
    w = a * adj
    return w / w.sum(2, keepdim=True) * adj


def pair_block(vgraph, tgraph, img, cap, img_pre, cap_pre, lambda_softmax, n, propagate):
    """Scores of Bi images x Cb captions of one length L: img (Bi, R, d), cap (Cb, L, d)
    -> (Bi, Cb). The two attentions share one blocked GEMM, D[b][r, l] = r^(b) . w_l^(b)
    (the full score is its sum over the chunks); each direction's cosine numerators are sums of
    D under its attention, and its context norms come from Gram matrices:
    |sum_l a_l w_l^(b)|^2 = a^T G^(b) a. So no (.., d)-sized context is ever built."""
    Bi, R, d = img.shape
    Cb, L, _ = cap.shape
    Vb, nr, Gi, gain = img_pre            # (n, Bi*R, q), (Bi, R, n), (Bi, n*R, R) or None, gains
    Wb, nw, Gc, mix = cap_pre             # (n, q, Cb*L), (Cb, L, n), (Cb, L, n*L), (Cb, L, L)
    D = torch.bmm(Vb, Wb)                                               # (n, Bi*R, Cb*L)
    if torch.is_grad_enabled():
        # training: the scores by their own GEMM. Through D.sum(0) the float32 gradient of
        # the text encoder carries twice the rounding (7e-5 relative against 4e-5: measured
        # on the fixtures against float64), for a step that is small anyway
        A = torch.mm(img.reshape(Bi * R, d), cap.reshape(Cb * L, d).t())
    else:
        A = D.sum(0)                                                    # (Bi*R, Cb*L)
    X = F.leaky_relu(A, 0.1).view(Bi, R, Cb, L)
    # i2t: each region over the words (scores l2-normalised over the regions)
    a = torch.softmax(X / (torch.linalg.vecdot(X, X, dim=1).unsqueeze(1).sqrt() + 1e-8)
                      * lambda_softmax, dim=3)                          # (Bi, R, Cb, L)
    # t2i: each word over the regions (scores l2-normalised over the words)
    beta = torch.softmax(X / (torch.linalg.vector_norm(X, dim=3, keepdim=True) + 1e-8)
                         * lambda_softmax, dim=1)                       # (Bi, R, Cb, L)
    Dv = D.view(n, Bi, R, Cb, L)
    num_v = (Dv * a).sum(4)                                             # (n, Bi, R, Cb)
    num_t = (Dv * beta).sum(2)                                          # (n, Bi, Cb, L)
    a_c = a.permute(2, 0, 1, 3).reshape(Cb, Bi * R, L)
    sq_v = (torch.bmm(a_c, Gc).view(Cb, Bi * R, n, L) * a_c.unsqueeze(2)).sum(3)  # (Cb,BiR,n)
    beta_f = beta.reshape(Bi, R, Cb * L)
    if Gi is not None:  # n R^2 multiply-adds per word
        sq_t = (torch.bmm(Gi, beta_f).view(Bi, n, R, Cb * L) * beta_f.unsqueeze(1)).sum(2)
        sq_t = sq_t.view(Bi, n, Cb, L).permute(0, 2, 3, 1)              # (Bi, Cb, L, n)
    else:  # chunks narrower than R: the contexts themselves are cheaper (R d per word)
        ctx = torch.bmm(beta_f.transpose(1, 2), img)                    # (Bi, Cb*L, d)
        sq_t = ctx.view(Bi, Cb, L, n, d // n).square().sum(4)           # (Bi, Cb, L, n)
    sq_v = sq_v.view(Cb, Bi, R, n).permute(1, 2, 0, 3)                  # (Bi, R, Cb, n)
    # sqrt of max(q, 1e-16): = max(|c|, 1e-8) up to the clamp, with a finite gradient
    m_v = num_v.permute(1, 2, 3, 0) / (nr.unsqueeze(2) *
                                       sq_v.clamp(min=1e-16).sqrt()).clamp(min=COS_EPS)
    m_t = num_t.permute(1, 2, 3, 0) / (nw.unsqueeze(0) *
                                       sq_t.clamp(min=1e-16).sqrt()).clamp(min=COS_EPS)
    return (visual_head(vgraph, m_v, gain, propagate) +
            textual_head(tgraph, m_t, mix, propagate))                  # (Bi, Cb)


def visual_head(vgraph, m_v, gain, propagate):
    """m_v (Bi, R, Cb, n) -> the visual-graph scores (Bi, Cb). gain: (Bi*R, n, h) folded
    matrices (visual_head_matrices), or with propagate the neighbour weights (Bi, R, R, K)."""
    Bi, R, Cb, n = m_v.shape
    out_1, out_2 = vgraph.out_1, vgraph.out_2
    if not propagate:
        pre = torch.baddbmm(out_1.bias, m_v.reshape(Bi * R, Cb, n), gain)  # (Bi*R, Cb, h)
    else:
        conv = vgraph.graph_convolution_1
        K = conv.n_kernels
        Wc = torch.cat([w.weight for w in conv.conv_weights], 0)       # (h, n)
        h = Wc.size(0)
        u = (m_v @ Wc.t()).view(Bi, R, Cb, K, h // K)                  # W_k m_j
        u = u.permute(0, 3, 1, 2, 4).reshape(Bi, K, R, Cb * (h // K))
        agg = torch.matmul(gain.permute(0, 3, 1, 2), u)                 # (Bi, K, R, Cb*o)
        agg = agg.view(Bi, K, R, Cb, h // K).permute(0, 2, 3, 1, 4).reshape(Bi * R, Cb, h)
        pre = torch.addmm(out_1.bias, agg.reshape(-1, h), out_1.weight.t()).view(Bi * R, Cb, -1)
    s = torch.matmul(torch.tanh(pre), out_2.weight.t()).squeeze(-1)    # (Bi*R, Cb)
    return s.view(Bi, R, Cb).mean(1) + out_2.bias                       # (Bi, Cb)


def textual_head(tgraph, m_t, mix, propagate):
    """m_t (Bi, Cb, L, n) -> the textual-graph scores (Bi, Cb). mix: each caption's neighbour
    map (textual_mixing). The released conv gives W_k (g_l m_l) + b_k with g_l = sum_j P_lj
    (1 up to rounding, but for a self-loop arc), so conv and out_1 fold into one map."""
    Bi, Cb, L, n = m_t.shape
    conv = tgraph.graph_convolution_3
    Wc = torch.cat([w.weight for w in conv.conv_weights], 0)           # (h, n)
    has_bias = conv.conv_weights[0].bias is not None
    bc = torch.cat([w.bias for w in conv.conv_weights], 0) if has_bias else None  # (h,)
    V1 = tgraph.out_1.weight
    if propagate:
        x = torch.matmul(mix.unsqueeze(0), m_t)                         # sum_j P_lj m_j
    elif mix is not None:
        x = m_t * mix.sum(2).unsqueeze(0).unsqueeze(-1)                 # g_l m_l
    else:
        x = m_t
    bias = tgraph.out_1.bias if bc is None else tgraph.out_1.bias + V1 @ bc
    pre = torch.addmm(bias, x.reshape(-1, n), (V1 @ Wc).t())            # (Bi*Cb*L, h)
    s = torch.matmul(torch.tanh(pre), tgraph.out_2.weight.t()).view(Bi, Cb, L)
    return s.mean(2) + tgraph.out_2.bias                                # (Bi, Cb)


def image_precompute(vgraph, img, boxes, num_block, propagate):
    """Per image chunk: chunks laid out for the blocked GEMM, chunk norms, chunk Grams, gains."""
    Bi, R, d = img.shape
    n = num_block
    Vb = img.reshape(Bi * R, n, d // n).transpose(0, 1).contiguous()   # (n, Bi*R, q)
    nr = chunk_norms(img, n)                                           # (Bi, R, n)
    # the t2i context norms from the regions' chunk Grams, unless the chunks are narrower
    # than R (pair_block then builds the contexts)
    Gi = chunk_gram(img, n).reshape(Bi, n * R, R) if d // n >= R else None  # (Bi, n*R, R)
    g = visual_gains(vgraph, boxes, propagate)
    gain = g if propagate else visual_head_matrices(vgraph, g)
    return Vb, nr, Gi, gain


def caption_precompute(cap, lambda_softmax, num_block, is_sparse, depends, propagate):
    """Per caption chunk of one length: the blocked words, chunk norms, chunk Grams, and the
    textual neighbour map (None where it is exactly the identity in effect: dense, released)."""
    Cb, L, d = cap.shape
    n = num_block
    Wb = cap.reshape(Cb * L, n, d // n).permute(1, 2, 0).contiguous()  # (n, q, Cb*L)
    nw = chunk_norms(cap, n)                                           # (Cb, L, n)
    Gc = chunk_gram(cap, n).permute(0, 2, 1, 3).reshape(Cb, L, n * L)  # (Cb, L, n*L)
    mix = textual_mixing(cap, L, lambda_softmax, is_sparse, depends) \
        if (is_sparse or propagate) else None
    return Wb, nw, Gc, mix


def gsmn_scores(vgraph, tgraph, img_emb, cap_emb, cap_lens, boxes, depends=None, *,
                lambda_softmax, num_block, is_sparse=False, propagate=False,
                block_elems=BLOCK_ELEMS, img_chunk=16):
    """Every (image, caption) score: img_emb (B, R, d) with boxes (B, R, 4), cap_emb (C, L, d)
    with lengths and, for sparse, one arc list per caption -> (B, C) in the embeddings' dtype.
    Captions go in blocks of one length (no padding, no masks), images in chunks of
    `img_chunk`; a block holds as many captions as keep its largest intermediate, (n, Bi, R,
    Cb, L), near `block_elems` elements. Works with autograd (training)."""
    B, R, d = img_emb.shape
    C = cap_emb.size(0)
    n = num_block
    lens = torch.as_tensor([int(x) for x in cap_lens], dtype=torch.int64)
    Bi = max(1, min(B, img_chunk))
    chunks = []                                   # (caption indices, words, precomputed)
    for L in torch.unique(lens).tolist():
        idx = torch.nonzero(lens == L).squeeze(1)
        Cb = max(1, block_elems // (n * Bi * R * L))
        for c0 in range(0, len(idx), Cb):
            sel = idx[c0:c0 + Cb]
            cap = cap_emb.index_select(0, sel.to(cap_emb.device))[:, :L]   # (Cb, L, d)
            dep = None if depends is None else [depends[int(i)] for i in sel]
            chunks.append((sel, cap, caption_precompute(cap, lambda_softmax, n, is_sparse,
                                                        dep, propagate)))
    order = torch.cat([sel for sel, _, _ in chunks])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(C)
    inv = inv.to(img_emb.device)
    rows = []
    for b0 in range(0, B, Bi):
        img = img_emb[b0:b0 + Bi]
        img_pre = image_precompute(vgraph, img, boxes[b0:b0 + Bi], n, propagate)
        row = torch.cat([pair_block(vgraph, tgraph, img, cap, img_pre, cap_pre,
                                    lambda_softmax, n, propagate)
                         for _, cap, cap_pre in chunks], 1)              # (Bi, C) chunk order
        rows.append(row.index_select(1, inv))
    return torch.cat(rows, 0)                                            # (B, C)


# ----------------------------------------------------------------------------- data

BBOX_MODES = ("original", "zero", "correct")


class GSMNDataset(data.PrecompDataset):
    """A split as the original GSMN reads it: items (image, word ids, index, image index,
    boxes (R, 4), arcs). Optional files beside `{split}_ims.npy` and `{split}_caps.txt`:
      `{split}_precaps_stan.txt`  the authors' word ids, used instead of tokenising caps.txt;
      `{split}_ims_bbx.npy`, `{split}_ims_size.npy`  boxes in pixels and image sizes;
      `{split}_caps.json`  dependency arcs (read for --is_sparse only).
    Boxes by `opt.bbox_mode`:
      original  (default) what the original's loader hands the model: without the box files
                zeros (its in-place division drives the boxes to 0); with them, a training
                split divides its own copy in place at every access (exact with --workers 0,
                which the original effectively ran with), an evaluation split gives each row the
                boxes its evalrank sees after reading the split twice, and, unless `opt.fold5`
                (set by the evaluation), image k the boxes of caption row k (image k // 5's);
      zero      always zeros;
      correct   each image's own boxes divided once by its size (what the original meant)."""

    def __init__(self, data_path, split, vocab, opt, train=False):
        super().__init__(data_path, split, vocab, feat_format=getattr(opt, "feat_format", "auto"),
                         img_dim=getattr(opt, "img_dim", None))
        loc = lambda name: os.path.join(data_path, name % split)  # noqa: E731
        n_img, n_regions = len(self.images), self.images.shape[1]
        self.ids = None
        if os.path.isfile(loc("%s_precaps_stan.txt")):
            self.ids = read_precaps(loc("%s_precaps_stan.txt"), len(self.captions), len(vocab))
            log.info("%s: word ids from %s", split, loc("%s_precaps_stan.txt"))
        self.mode = getattr(opt, "bbox_mode", "original")
        self.n_regions = n_regions
        self.state = self.per_item = self.per_image = None
        box_file, size_file = loc("%s_ims_bbx.npy"), loc("%s_ims_size.npy")
        have = [os.path.isfile(p) for p in (box_file, size_file)]
        if self.mode != "zero" and any(have):
            if not all(have):
                missing, other = (size_file, box_file) if have[0] else (box_file, size_file)
                raise errors.error("input_unpaired", missing, other=os.path.basename(other),
                                   why="the boxes are divided by the image sizes",
                                   without=NO_BOXES)
            boxes = load_boxes(box_file, n_img, n_regions)
            sizes = load_sizes(size_file, n_img)
            if self.mode == "correct":
                self.per_image = normalised_boxes(boxes, sizes).astype(np.float32)
            elif train:  # the original's loader: each access divides the array in place
                self.state = np.array(boxes)
                self.divisor = sizes[:, [0, 1, 0, 1]]
            else:
                rows = np.arange(self.length) // self.im_div
                counts = original_eval_counts(self.length, self.im_div, opt.batch_size,
                                              memory_shared=boxes.dtype == np.float32)
                seen = inplace_divided(boxes[rows], sizes[rows], counts).astype(np.float32)
                # evalrank(fold5=False) pairs image k with caption row k's boxes; encode_data
                # keeps the image of item k * im_div
                self.per_item = seen if getattr(opt, "fold5", False) else \
                    seen[np.minimum(np.arange(self.length) // self.im_div, self.length - 1)]
            log.info("%s: boxes from %s (--bbox_mode %s)", split, box_file, self.mode)
        elif self.mode == "correct":
            raise errors.error("input_required", box_file, flag="--bbox_mode correct",
                               why="--bbox_mode correct needs the boxes and %s"
                                   % os.path.basename(size_file))
        # arcs: for sparse training; at evaluation whenever present (a dense and a sparse
        # model may share one evaluation loader)
        self.depends = None
        if (getattr(opt, "is_sparse", False) or not train) and os.path.isfile(loc("%s_caps.json")):
            self.depends = load_depends(loc("%s_caps.json"), len(self.captions))
        elif getattr(opt, "is_sparse", False):
            log.info("%s: no %s: sparse word graphs of the identity (the released code scores "
                     "the same with the arcs)", split, os.path.basename(loc("%s_caps.json")))

    def boxes(self, index, img_id):
        if self.per_image is not None:
            return torch.from_numpy(self.per_image[img_id])
        if self.per_item is not None:
            return torch.from_numpy(self.per_item[index])
        if self.state is not None:
            b = self.state[img_id]                  # a view: divided in place, as the original
            if np.issubdtype(b.dtype, np.integer):  # Python 2's integer division
                b[...] = (b / self.divisor[img_id]).astype(b.dtype)
            else:
                b /= self.divisor[img_id]
            # a float32 array is shared, as the original's torch.Tensor(array): every row of
            # this image in the batch shows the last division when the batch is collated
            return torch.from_numpy(b) if b.dtype == np.float32 else \
                torch.tensor(b, dtype=torch.float32)
        return torch.zeros(self.n_regions, 4)

    def __getitem__(self, index):
        img_id = index // self.im_div
        image = torch.from_numpy(np.array(self.images[img_id], dtype=np.float32))
        ids = self.ids[index] if self.ids is not None else \
            encode_caption(self.vocab, self.captions[index])
        depend = self.depends[index] if self.depends is not None else None
        return (image, torch.tensor(ids, dtype=torch.int64), index, img_id,
                self.boxes(index, img_id), depend)


def collate_fn(items):
    """data.collate_fn's batch (sorted by caption length, longest first) with the extras
    `boxes` (B, R, 4) and `depends` (one arc list or None per caption)."""
    items = sorted(items, key=lambda x: len(x[1]), reverse=True)
    batch = data.collate_fn([x[:4] for x in items])
    batch.extra["boxes"] = torch.stack([x[4] for x in items], 0)
    batch.extra["depends"] = [x[5] for x in items]
    return batch


# ----------------------------------------------------------------------------- wrapper

# Our EncoderText names its GRU `cap_rnn` (SGRAF); GSMN's checkpoints call it `rnn`.
_OURS, _THEIRS = "cap_rnn.", "rnn."


def _rename(state_dict, old, new):
    return type(state_dict)((new + k[len(old):] if k.startswith(old) else k, v)
                            for k, v in state_dict.items())


def check_dims(opt):
    """(flag, reason) when GSMN cannot be built with these dimensions, else None."""
    if opt.embed_size % opt.num_block:
        return "num_block", "it must divide --embed_size %d" % opt.embed_size
    if opt.feat_dim != opt.num_block:
        return "feat_dim", ("it must equal --num_block %d (the graphs read one cosine per "
                            "chunk)" % opt.num_block)
    if opt.hid_dim % N_KERNELS:
        return "hid_dim", "it must be a multiple of the %d kernels" % N_KERNELS
    if opt.out_dim != 1:
        return "out_dim", "the graphs score each node with one number: --out_dim 1"
    return None


class GraphScorer(nn.Module):
    """Both graphs as one module whose forward scores a batch (the fast path), so that a
    DistributedDataParallel wrapper sees the training forward. Not in the checkpoint (its
    parameters are the two graphs')."""

    def __init__(self, vgraph, tgraph, opt):
        super().__init__()
        self.vgraph, self.tgraph, self.opt = vgraph, tgraph, opt

    def forward(self, img_emb, cap_emb, cap_lens, boxes, depends=None):
        o = self.opt
        return gsmn_scores(self.vgraph, self.tgraph, img_emb, cap_emb, cap_lens, boxes, depends,
                           lambda_softmax=o.lambda_softmax, num_block=o.num_block,
                           is_sparse=o.is_sparse, propagate=o.gsmn_propagate)


class GSMN(Matcher):
    """The two encoders, the two graphs, the hinge loss, Adam and the train step.
    `state_dict()` is the original checkpoint's `'model'` entry: [img_enc, txt_enc,
    i2t_match_G, t2i_match_G] state dicts.

    forward_sim scores every pair with the fast path (gsmn_scores; in training too, with
    autograd); forward_sim_percaption is the original loop, kept as the reference."""

    state_names = ("img_enc", "txt_enc", "i2t_match_G", "t2i_match_G")
    # the original train.py's defaults where they differ from the shared parser's
    defaults = {"lambda_softmax": 9.0, "num_epochs": 30, "lr_update": 15, "log_step": 100,
                "val_step": 15000, "is_sparse": False, "num_block": 16, "feat_dim": 16,
                "hid_dim": 32, "out_dim": 1, "bbox_mode": "original", "gsmn_propagate": False}
    score_inputs = {"boxes": "image", "depends": "caption"}
    collate_fn = staticmethod(collate_fn)
    # the sum of violations, as SGR's demo: trained from random weights, the hardest-negative
    # hinge (the default, for real data) risks collapsing the scores, as VSE++ warns
    demo_flags = ["--no-max_violation"]

    # ------------------------------------------------------------------ the class
    @classmethod
    def add_options(cls, parser):
        g = parser.add_argument_group("GSMN (gsmn.py)")
        add = cls.add_option
        add(g, "--is_sparse", action="store_true",
            help="sparse GSMN: the word graph from the dependency arcs ({split}_caps.json); "
                 "dense (default): word-word attention")
        add(g, "--num_block", default=16, type=int,
            help="chunks of the embedding whose cosines make a node's matching vector")
        add(g, "--feat_dim", default=16, type=int,
            help="input size of the graph convolutions (must equal --num_block)")
        add(g, "--hid_dim", default=32, type=int, help="graph convolution output size")
        add(g, "--out_dim", default=1, type=int, help="score per node (1)")
        add(g, "--lambda_softmax", default=9.0, type=float,
            help="attention softmax temperature (GSMN's default 9; its README trains with 20 "
                 "on Flickr30K, 10 on COCO)")
        add(g, "--bbox_mode", default="original", choices=BBOX_MODES,
            help="boxes fed to the visual graph: original (as the original's loader, which "
                 "divides them in place at every access; zeros without the box files), zero, "
                 "or correct (divided once by the image size)")
        add(g, "--gsmn_propagate", action="store_true",
            help="graphs as in the paper (neighbour vectors; visual kernels normalised over "
                 "the neighbours) instead of the released code's per-node graphs; not the "
                 "published numbers")

    @classmethod
    def complete_opt(cls, opt):
        return super().complete_opt(opt)

    @classmethod
    def check_opt(cls, opt, distributed=False):
        errors.check_positive(opt, ("num_block", "feat_dim", "hid_dim", "out_dim"))
        problem = check_dims(opt)
        if problem:
            flag, why = problem
            raise errors.error("flag_unsupported", errors.opt_where(opt, flag), model="GSMN",
                               why=why)

    @classmethod
    def dataset(cls, data_path, split, vocab, opt, train=False):
        return GSMNDataset(data_path, split, vocab, opt, train=train)

    @classmethod
    def recognise(cls, ckpt):
        state = ckpt["model"]
        if (len(state) == 4 and "fc.weight" in state[0] and
                "graph_convolution_1.mean_rho" in state[2] and
                "graph_convolution_3.params" in state[3]):
            return "GSMN"
        return None

    @classmethod
    def infer_flags(cls, state, opt=None):
        img, txt = state[0], state[1] if len(state) > 1 else {}
        vg = state[2] if len(state) > 2 else {}
        shape = checkpoint.state_shape
        layers = [int(m.group(1)) for k in txt
                  for m in [re.match(r"(?:cap_)?rnn\.weight_ih_l(\d+)", k)] if m]
        feat = shape(vg, "graph_convolution_1.conv_weights.0.weight", 1)
        return {"module_name": "GSMN" if len(state) == 4 and vg else None,
                "img_dim": shape(img, "fc.weight", 1),
                "embed_size": shape(img, "fc.weight", 0),
                "vocab_size": shape(txt, "embed.weight", 0),
                "word_dim": shape(txt, "embed.weight", 1),
                "num_layers": max(layers) + 1 if layers else None,
                "bi_gru": any(k.endswith("_reverse") for k in txt) if layers else None,
                "feat_dim": feat, "num_block": feat,
                "hid_dim": shape(vg, "out_1.weight_v", 0),
                "out_dim": shape(vg, "out_2.weight_v", 0),
                # dense and sparse weights are alike: only the checkpoint's options say
                "is_sparse": getattr(opt, "is_sparse", None) if opt is not None else None}

    # ------------------------------------------------------------------ the instance
    def __init__(self, opt, device=None):
        self.complete_opt(opt)
        super().__init__(opt, device)
        problem = check_dims(opt)
        if problem:
            raise ValueError(problem[1])
        self.img_enc = EncoderImage(opt.img_dim, opt.embed_size, no_imgnorm=opt.no_imgnorm)
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size,
                                   opt.num_layers, use_bi_gru=opt.bi_gru,
                                   no_txtnorm=opt.no_txtnorm)
        self.txt_enc.dropout = nn.Identity()  # the original GSMN text encoder has no dropout
        self.i2t_match_G = VisualGraph(opt.feat_dim, opt.hid_dim, opt.out_dim, dropout=.5)
        self.t2i_match_G = TextualGraph(opt.feat_dim, opt.hid_dim, opt.out_dim, dropout=.5)
        self.scorer = GraphScorer(self.i2t_match_G, self.t2i_match_G, opt)
        self.criterion = ContrastiveLoss(margin=opt.margin, max_violation=opt.max_violation)
        self.setup()

    def modules(self):
        return [self.img_enc, self.txt_enc, self.i2t_match_G, self.t2i_match_G]

    def param_groups(self):
        # the original's order (text encoder, img_enc.fc, the two graphs): Adam's follows it
        return [{"params": (list(self.txt_enc.parameters()) + list(self.img_enc.fc.parameters()) +
                            list(self.i2t_match_G.parameters()) +
                            list(self.t2i_match_G.parameters())),
                 "lr": self.opt.learning_rate}]

    def state_dict(self):
        sd = [m.state_dict() for m in self.modules()]
        sd[1] = _rename(sd[1], _OURS, _THEIRS)
        return sd

    def load_state_dict(self, state_dict, strict=True):
        if len(state_dict) != 4:
            raise ValueError("expected 4 state dicts (%s), got %d"
                             % (", ".join(self.state_names), len(state_dict)))
        sds = list(state_dict)
        sds[1] = _rename(sds[1], _THEIRS, _OURS)
        for m, sd in zip(self.modules(), sds):
            m.load_state_dict(sd, strict=strict)

    def ddp(self, device_ids=None):
        """The encoders and the graph scorer in DistributedDataParallel; the textual kernel
        scalars cancel out of the scores and never get a gradient (after_backward fills the
        exact zero on every process)."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self._ddp = [DDP(self.img_enc, device_ids=device_ids),
                     DDP(self.txt_enc, device_ids=device_ids),
                     DDP(self.scorer, device_ids=device_ids, find_unused_parameters=True)]
        return self

    def trained(self):
        return self._ddp or [self.img_enc, self.txt_enc, self.scorer]

    # ------------------------------------------------------------------ scores
    def forward_emb(self, images, captions, lengths, **extra):
        images = images.to(self.device, non_blocking=True)
        captions = captions.to(self.device, non_blocking=True)
        return self.img_enc(images), self.txt_enc(captions, lengths), lengths

    def _sim_kw(self):
        o = self.opt
        return dict(lambda_softmax=o.lambda_softmax, num_block=o.num_block,
                    is_sparse=o.is_sparse, propagate=o.gsmn_propagate)

    def forward_sim(self, img_emb, cap_emb, cap_lens, boxes, depends=None, **kw):
        """(B, C) scores by the fast path; boxes (B, R, 4) as the graphs receive them."""
        return gsmn_scores(self.i2t_match_G, self.t2i_match_G, img_emb, cap_emb, cap_lens,
                           boxes.to(img_emb.device, img_emb.dtype), depends,
                           **self._sim_kw(), **kw)

    def forward_sim_percaption(self, img_emb, cap_emb, cap_lens, boxes, depends=None):
        """The original forward_sim: both graphs' per-caption loops, summed. (B, C)."""
        kw = self._sim_kw()
        boxes = boxes.to(img_emb.device, img_emb.dtype)
        i2t = self.i2t_match_G(img_emb, cap_emb, boxes, cap_lens, kw["lambda_softmax"],
                               kw["num_block"], kw["propagate"])
        t2i = self.t2i_match_G(img_emb, cap_emb, depends, cap_lens, kw["lambda_softmax"],
                               kw["num_block"], kw["is_sparse"], kw["propagate"])
        return i2t + t2i

    def score(self, img_embs, cap_embs, cap_lens, shard_size=None, boxes=None, depends=None,
              **extra):
        """(n_images, n_captions) float64 scores in eval mode. boxes: per image (R, 4), as
        encode_data keeps them (None: zeros); depends: per caption. `shard_size`: shards of
        shard_size images x shard_size captions (the original's 80); None: caption shards
        sized by the memory available, all images at once (gsmn_scores chunks them)."""
        self.val_start()
        n_im, n_cap = len(img_embs), len(cap_embs)
        sims = np.zeros((n_im, n_cap))
        if n_im == 0 or n_cap == 0:
            return sims
        R, d = img_embs.shape[1], img_embs.shape[2]
        if boxes is None:
            boxes = torch.zeros(n_im, R, 4)
        elif not torch.is_tensor(boxes):
            boxes = torch.stack([torch.as_tensor(b) for b in boxes])
        if shard_size:
            im_shard = cap_shard = int(shard_size)
        else:
            # a caption shard's words are copied twice (chunk layout, Gram matrices)
            im_shard = n_im
            cap_shard = max(1, min(n_cap, memory_budget() // (cap_embs.shape[1] * d * 4 * 3)))
        shards = [(i, j) for i in range(0, n_im, im_shard) for j in range(0, n_cap, cap_shard)]
        for i, j in self.progress(shards, desc="gsmn scores"):
            im_end, ca_end = min(i + im_shard, n_im), min(j + cap_shard, n_cap)
            lens = [int(x) for x in cap_lens[j:ca_end]]
            with torch.no_grad():
                im = torch.from_numpy(np.asarray(img_embs[i:im_end], dtype=np.float32))
                ca = torch.from_numpy(np.ascontiguousarray(cap_embs[j:ca_end, :max(lens)],
                                                           dtype=np.float32))
                s = self.forward_sim(im.to(self.device), ca.to(self.device), lens,
                                     boxes[i:im_end].to(self.device, torch.float32),
                                     None if depends is None else depends[j:ca_end])
            sims[i:im_end, j:ca_end] = s.cpu().numpy()
        return sims

    # ------------------------------------------------------------------ search (retrieve.py)
    attention_info = ("SCAN's text-to-image attention of GSMN's textual graph (node-level "
                      "matching): for each word, a softmax over the image's regions "
                      "(temperature {opt.lambda_softmax:g})")

    def query_batch(self, text, vocab):
        """SCAN's tokenisation (contract.Matcher), with no dependency arcs: a free-text query has
        no parse, so a sparse model's word graph is the identity, which the released code
        scores alike (the arcs change a score only through a self-loop arc, see the top). A
        split read from the authors' `{split}_precaps_stan.txt` was tokenised by their parser,
        so a query equal to one of its captions may not get the same word ids."""
        q = super().query_batch(text, vocab)
        return q._replace(extra={"depends": [None]})

    def word_region_attention(self, img_embs, cap_embs, cap_lens, **extra):
        """The textual graph's node-level attention of each pair (image k, caption k): each
        word over the regions (inter_relations, as TextualGraph.node_level_matching),
        (cap_lens[k], R) each. (The visual graph's attention runs the other way, each region
        over the words.)"""
        self.val_start()
        out = []
        with torch.no_grad():
            for k, n in enumerate(cap_lens):
                img = torch.as_tensor(np.asarray(img_embs[k:k + 1], dtype=np.float32),
                                      device=self.device)                       # (1, R, d)
                cap = torch.as_tensor(np.asarray(cap_embs[k:k + 1, :int(n)], dtype=np.float32),
                                      device=self.device)                       # (1, L, d)
                attn = inter_relations(img, cap, self.opt.lambda_softmax)       # (1, L, R)
                out.append(attn[0].double().cpu().numpy())
        return out

    # ------------------------------------------------------------------ training
    def forward_loss(self, sims, **kwargs):
        with fp32(sims) as sims:  # the loss in fp32 under --precision bf16
            loss = self.criterion(sims)
        self.logger.update("Loss", loss.item(), sims.size(0))
        return loss

    def train_loss(self, images, captions, lengths, ids=None, boxes=None, depends=None,
                   **extra):
        """The hinge loss of the batch's (B, B) scores; pair k is (image k, caption k) with
        image k's boxes (B, R, 4) and caption k's arcs."""
        img_enc, txt_enc, scorer = self.trained()
        img_emb = img_enc(images.to(self.device, non_blocking=True))           # (B, R, d)
        cap_emb = txt_enc(captions.to(self.device, non_blocking=True), lengths)  # (B, L, d)
        if boxes is None:
            boxes = torch.zeros(img_emb.shape[:2] + (4,))
        sims = scorer(img_emb, cap_emb, lengths, boxes.to(self.device, img_emb.dtype), depends)
        loss = self.forward_loss(sims)
        return loss, loss

    def after_backward(self):
        # parameters that cancel exactly (the textual kernel scalars) have no gradient: an
        # exact zero, for Adam and clipping (the original's Adam moves them on float noise)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    # ------------------------------------------------------------------ benchmark (bench.py)
    # the original evaluation's shard_xattn(..., shard_size=80): caption by caption through the
    # literal graphs (forward_sim_percaption), on boxes normalised in [0, 1] (bench_boxes)
    bench_ref_shard = 80

    @classmethod
    def add_bench_options(cls, parser):
        parser.add_argument("--gsmn_batch", type=int, default=64,
                            help="GSMN's training batch (its README's Flickr30K batch)")
        parser.add_argument("--gsmn_original", default=None, metavar="DIR",
                            help="also time the original GSMN code's shard_xattn from this "
                                 "checkout (made to run under Python 3 on CPU)")

    @classmethod
    def check_bench_args(cls, args):
        errors.check_positive(args, ["gsmn_batch"])
        if args.gsmn_original is not None:
            errors.check_dir(args.gsmn_original, "--gsmn_original %s" % args.gsmn_original,
                             expected="a checkout of the original GSMN code")
        if args.quick:
            args.gsmn_batch = 16

    @classmethod
    def bench_model(cls, args, name, variant=None):
        """The original train.py's defaults (lambda_softmax 9, dense arcs), learning rate 2e-4."""
        opt = bench_opt(args, name)
        for k, v in cls.defaults.items():
            setattr(opt, k, v)
        return cls(opt), opt

    @classmethod
    def bench_embeddings(cls, args, rng, lens):
        img, cap = random_embeddings(args, rng, lens)
        return img, cap, lens.tolist(), {"boxes": torch.from_numpy(bench_boxes(args.n_img, rng))}

    @classmethod
    def bench_train_batch(cls, args):
        # the per-caption step at 128 needs about 20 GB
        return args.gsmn_batch

    @classmethod
    def original_flops(cls, name, n_img, lens, R=36, d=1024, s=256, shard=100, intra=True):
        """shard_xattn: per pair, both directions' scores (R x d x L) and contexts, the visual
        graph's patch operator (R x 8 x R x n) and the textual one's (L x 8 x L x n), the conv
        and head Linears on every node; per caption the word-word attention."""
        n, h = 16, 32
        return sum(n_img * (8 * L * R * d + 2 * R * 8 * R * n + 2 * R * (n * h + h * h + h) +
                            2 * L * 8 * L * n + 2 * L * (n * h + h * h + h)) + 2 * L * L * d
                   for L in lens)

    @classmethod
    def bench_original_code(cls, args):
        return args.gsmn_original

    @classmethod
    def bench_original(cls, args):
        return OriginalGSMN(args)

    def percaption_scores(self, args, img_embs, cap_embs, cap_lens, boxes=None, **extra):
        return percaption_gsmn_scores(self, img_embs, cap_embs, cap_lens, boxes,
                                      self.bench_ref_shard)

    def bench_train_inputs(self, args, rng):
        images, captions, lens = random_batch(args, self.bench_train_batch(args), rng)
        return images, captions, lens, None, {
            "boxes": torch.from_numpy(bench_boxes(len(lens), rng))}


def bench_boxes(n_img, rng):
    """Boxes normalised to [0, 1] (x1 <= x2, y1 <= y2), (n_img, 36, 4) float32, so that the
    geometry gains differ between regions."""
    xy = rng.uniform(0, 0.7, (n_img, 36, 2))
    return np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (n_img, 36, 2))], 2) \
        .astype(np.float32)


def percaption_gsmn_scores(model, img_embs, cap_embs, cap_lens, boxes, shard_size=80):
    """The original GSMN shard_xattn: shard_size x shard_size shards, each scored by the
    original forward_sim (both graphs' per-caption loops): the oracle of GSMN.score."""
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(0, len(img_embs), shard_size):
        for j in range(0, len(cap_embs), shard_size):
            lens = cap_lens[j:j + shard_size]
            with torch.no_grad():
                im = torch.from_numpy(img_embs[i:i + shard_size]).to(model.device)
                ca = torch.from_numpy(cap_embs[j:j + shard_size]).to(model.device)
                bx = torch.as_tensor(boxes[i:i + shard_size]).to(model.device)
                sim = model.forward_sim_percaption(im, ca, lens, bx)
            sims[i:i + shard_size, j:j + shard_size] = sim.cpu().numpy()
    return sims


class OriginalGSMN:
    """The ORIGINAL code's evaluation (shard_xattn, shards of 80), from the checkout
    --gsmn_original (CrossmodalGroup/GSMN made to run under Python 3 on CPU; README, GSMN), at
    bench.py's sizes with the caller's torch seed. Its modules (model, evaluation, data, vocab,
    ...) are imported under their own names, ours of those names set aside; `close()` puts
    ours back and returns its weights (our names: they load strictly)."""

    def __init__(self, args):
        self.path = os.path.abspath(args.gsmn_original)
        self.opt = argparse.Namespace(
            img_dim=args.img_dim, embed_size=args.embed_size, word_dim=args.word_dim,
            vocab_size=args.vocab_size, num_layers=1, bi_gru=True, no_imgnorm=False,
            no_txtnorm=False, feat_dim=16, num_block=16, hid_dim=32, out_dim=1,
            lambda_softmax=9.0, is_sparse=False, margin=0.2, max_violation=True, grad_clip=2.0,
            learning_rate=2e-4)
        # ours of the same names (model, evaluation, data, vocab) step aside until close()
        self.theirs = {os.path.splitext(f)[0] for f in os.listdir(self.path)
                       if f.endswith(".py")}
        self.ours = {n: sys.modules.pop(n) for n in self.theirs if n in sys.modules}
        sys.path.insert(0, self.path)
        self.evaluation = importlib.import_module("evaluation")
        self.model = importlib.import_module("model").GSMN(self.opt)
        self.model.val_start()

    def scores(self, img_embs, cap_embs, cap_lens, boxes=None, **extra):
        deps = [[[0, 1]]] * len(cap_lens)
        return self.evaluation.shard_xattn(self.model, img_embs, cap_embs,
                                           np.asarray(boxes).astype(np.float64), deps,
                                           cap_lens, self.opt, shard_size=80)

    def close(self):
        state = [{k: v.clone() for k, v in sd.items()} for sd in self.model.state_dict()]
        for name in self.theirs:
            sys.modules.pop(name, None)
        sys.modules.update(self.ours)
        sys.path.remove(self.path)
        return state
