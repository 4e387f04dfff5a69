"""Fast SGRAF similarity: many images x many captions at once, the same numbers as the original.

The original scores one caption at a time against all images (`EncoderSimilarity.
forward_percaption`, kept in model.py as the oracle). This file computes the same (B, C) matrix
in blocks and uses exact algebra to skip work:

- captions of equal length form a block (no padding, no masks); only tiny groups are merged
  into padded, masked blocks (pad words are kept out of the l2norm across words, of SGR's
  softmax over nodes, and of SAF's L1 normalisation and BatchNorm statistics);
- word-to-region attention of a block is one GEMM, regions of Bi images (Bi*R, d) against the
  words of Cb captions (Cb*L, d);
- the image and caption global vectors are computed once, not per pair;
- SGR: softmax_k((Wq n_i + bq).(Wk n_k + bk)) = softmax_k(n_i^T (Wq^T Wk) n_k + (Wk^T bq).n_k),
  since the other terms are constant along the key axis; Wg(E N) + bg = E (N Wg^T + bg) since
  the rows of E sum to 1. So a step is one (s, 2s) GEMM per node and two small bmms. The last
  step only needs node 0 (its query, one row of edges, one output row);
- SAF in training: per-caption BatchNorm statistics, running stats updated once per caption in
  closed form (momentum m applied C times in sequence);
- buffers of the no-grad path are reused between blocks (a fresh large tensor costs page faults).

`subset_loss` is the training trick for SGR: the hinge with max-violation uses one negative per
row and per column, so the B x B matrix is scored without autograd, and only the pairs the
loss uses are recomputed with gradients.

Letters: B images, C captions, P pairs, R regions, L words, N = L+1 nodes, d embed_size,
s sim_dim.
"""
import math

import torch
import torch.nn.functional as F

EPS = 1e-8         # l1norm / l2norm eps, as the original
SMOOTH = 9.0       # SCAN's lambda (softmax temperature over regions)
WORD_PAIRS = 2048  # (image, caption word) pairs per chunk: sets the size of the scratch buffers
ATTN_WORDS = 512   # caption words whose attention against all images is computed at once
WORD_PAIRS_GRAD = 16384  # the same with autograd (bigger GEMMs for the backward)
GRAD_ROWS = 512    # word-pairs per chunk inside LocalSimilarity (kept in cache)
MIN_BLOCK_PAIRS = 16   # captions of rarer lengths are merged (padded, masked) up to this many pairs
#                      (one image against its candidate captions: a block per length is faster)


DENSE_SUPPORT = 0.25  # subset_loss: above this fraction of pairs, recompute the whole matrix


def _out(sc, name, shape, like):
    """{'out': a reused buffer} with a Scratch, else {} (allocate, as autograd needs)."""
    return {} if sc is None else {"out": sc.get(name, shape, like)}


class Scratch:
    """Reusable flat buffers, one per name, grown when a larger view is asked for."""

    def __init__(self):
        self.bufs = {}

    def get(self, name, shape, like):
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != like.dtype or b.device != like.device:
            b = torch.empty(n, dtype=like.dtype, device=like.device)
            self.bufs[name] = b
        return b[:n].view(shape)


def norm(x, dim):
    """The 2-norm along dim, keeping it. vector_norm is fast along the last axis but about 50x
    slower than a multiply-and-sum along an outer one (a strided reduction): pick by axis."""
    if dim in (-1, x.dim() - 1):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return torch.linalg.vecdot(x, x, dim=dim).unsqueeze(dim).sqrt()


def softmax_(x):
    """Softmax over the last axis. Without autograd and for fewer than 16 entries, in place by
    max, exp, sum and divide: ATen's kernel takes a slow path below 16 (3-7x slower on SGR's
    (P, N, N) edges). Otherwise torch.softmax."""
    if torch.is_grad_enabled() or x.size(-1) >= 16:
        return torch.softmax(x, dim=-1)
    x = x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def l2norm(x, dim=-1):
    """x / (||x|| + eps) along dim, as contract.l2norm."""
    return x / (norm(x, dim) + EPS)


# ----------------------------------------------------------------------------- blocks

def length_blocks(cap_lens, n_images, min_pairs=MIN_BLOCK_PAIRS):
    """Caption blocks: [(L, idx (Cg,) int64, lens (Cg,) or None)], ascending length. A block
    holds captions of one length (lens None) unless a length is so rare that n_images x its
    count < min_pairs, in which case it is merged with the next lengths into a padded block
    (lens given, L its longest)."""
    lens = torch.as_tensor([int(x) for x in cap_lens], dtype=torch.int64)
    uniq, counts = torch.unique(lens, return_counts=True)
    blocks, pend, pend_n = [], [], 0
    for L, n in zip(uniq.tolist(), counts.tolist()):
        pend.append(L)
        pend_n += n
        if pend_n * n_images >= min_pairs:
            blocks.append(pend)
            pend, pend_n = [], 0
    if pend:
        if blocks and pend_n * n_images < min_pairs:
            blocks[-1] = blocks[-1] + pend
        else:
            blocks.append(pend)
    out = []
    for group in blocks:
        sel = (lens.unsqueeze(1) == torch.tensor(group).unsqueeze(0)).any(1)
        idx = torch.nonzero(sel).squeeze(1)
        out.append((max(group), idx, None if len(group) == 1 else lens[idx]))
    return out


def word_mask(lens, L, device):
    """(C, L) bool, True on real words; lens: a tensor or a sequence of C lengths."""
    lens = torch.as_tensor(lens, device=device).view(-1, 1)
    return torch.arange(L, device=device).view(1, -1) < lens


# ----------------------------------------------------------------------------- global vectors

def caption_globals(t_global_w, cap_emb, cap_lens):
    """TextSA over each caption's real words, by blocks of equal length: (C, d)."""
    C = cap_emb.size(0)
    lens = torch.as_tensor([int(x) for x in cap_lens], dtype=torch.int64)
    parts, order = [], []
    for L in torch.unique(lens).tolist():
        idx = torch.nonzero(lens == L).squeeze(1)
        w = cap_emb[idx.to(cap_emb.device), :L]                   # (Cg, L, d)
        parts.append(t_global_w(w, w.mean(1)))                    # (Cg, d)
        order.append(idx)
    glo = torch.cat(parts, 0)
    inv = torch.empty(C, dtype=torch.int64)
    inv[torch.cat(order)] = torch.arange(C)
    return glo.index_select(0, inv.to(glo.device))               # (C, d)


# ----------------------------------------------------------------------------- folded weights

def sgr_weights(sgr_modules):
    """Per step but the last: (Wcat (s, 2s), bcat (2s,)) so that nodes @ Wcat + bcat gives
    [queries already multiplied by Wk | Wg-projected nodes]. The last step, which only needs
    node 0's query: (Wq^T Wk, bq Wk, Wg, bg). The key bias only adds terms constant along the
    softmax axis: it drops out."""
    out = []
    for m in sgr_modules[:-1]:
        wq, wk, wg = m.graph_query_w, m.graph_key_w, m.sim_graph_w
        wcat = torch.cat([wq.weight.t() @ wk.weight, wg.weight.t()], 1)   # (s, 2s)
        bcat = torch.cat([wq.bias @ wk.weight, wg.bias])                    # (2s,)
        out.append((wcat, bcat))
    m = sgr_modules[-1]
    wq, wk = m.graph_query_w, m.graph_key_w
    out.append((wq.weight.t() @ wk.weight, wq.bias @ wk.weight, m.sim_graph_w.weight,
                m.sim_graph_w.bias))
    return out


# ----------------------------------------------------------------------------- heads

def sgr_head(weights, nodes, key_mask=None, sc=None):
    """SGR reasoning; nodes (P, N, s) with node 0 the global one, key_mask (P, N) bool or None.
    With a Scratch `sc` (no autograd) the per-step tensors live in reused buffers (fresh ones
    of a few MB cost about a quarter of the head's time in page faults). Returns the final
    node 0, (P, s)."""
    P, N, s = nodes.shape
    inplace = not torch.is_grad_enabled()
    neg = None if key_mask is None else (~key_mask).unsqueeze(1)  # (P, 1, N)
    for k, (wcat, bcat) in enumerate(weights[:-1]):
        if inplace:  # one GEMM for the queries and the values
            pm = torch.addmm(bcat, nodes.reshape(P * N, s), wcat,
                             **_out(sc, "sgr_pm", (P * N, 2 * s), nodes)).view(P, N, 2 * s)
            query, value = pm[..., :s], pm[..., s:]
        else:  # two: the backward of a slice would write a zero-filled (P, N, 2s) per half
            flat = nodes.reshape(P * N, s)
            query = torch.addmm(bcat[:s], flat, wcat[:, :s]).view(P, N, s)
            value = torch.addmm(bcat[s:], flat, wcat[:, s:]).view(P, N, s)
        scores = torch.bmm(query, nodes.transpose(1, 2),
                           **_out(sc, "sgr_scores", (P, N, N), nodes))  # (P, N, N)
        if neg is not None:
            scores = scores.masked_fill_(neg, -math.inf) if inplace else \
                scores.masked_fill(neg, -math.inf)
        edges = softmax_(scores)
        # two alternating buffers: the step reads the previous nodes while writing the new
        nodes = torch.bmm(edges, value, **_out(sc, "sgr_nodes%d" % (k % 2), (P, N, s),
                                                nodes))   # (P, N, s)
        nodes = nodes.relu_() if inplace else nodes.relu()
    a, c, wg, bg = weights[-1]
    u = torch.addmm(c, nodes[:, 0], a)                            # (P, s): Wk^T q
    # matrix-vector products: multiply-and-sum beats a batch of tiny GEMMs
    scores = (nodes * u.unsqueeze(1)).sum(2)                      # (P, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, -math.inf)
    edges = softmax_(scores)
    agg = (edges.unsqueeze(2) * nodes).sum(1)                     # (P, s)
    return torch.relu(torch.addmm(bg, agg, wg.t()))               # (P, s)


def saf_head(saf, nodes, node_mask=None, n_img=None, bn_stats=None):
    """SAF filtration; nodes (P, N, s). In training the BatchNorm statistics are taken per
    caption: P must be laid out (n_img, Cb) with all images of each caption, and the per-caption
    (mean, biased var, count) are appended to bn_stats. node_mask (P, N) or None."""
    P, N, s = nodes.shape
    bn = saf.bn
    logits = torch.addmm(saf.attn_sim_w.bias, nodes.reshape(P * N, s),
                         saf.attn_sim_w.weight.t()).view(P, N)    # (P, N)
    if bn.training or bn.running_mean is None:
        # the batch statistics in fp32 under a bf16 autocast (train.py --precision bf16;
        # a no-op in fp32): SGRAF.fp32_parts
        lg = logits.float().view(n_img, P // n_img, N)            # (B, Cb, N)
        m = None if node_mask is None else node_mask.view(n_img, P // n_img, N).to(lg.dtype)
        cnt = torch.full((lg.size(1),), float(n_img * N), dtype=lg.dtype, device=lg.device) \
            if m is None else m.sum((0, 2))                       # (Cb,)
        mean = (lg if m is None else lg * m).sum((0, 2)) / cnt
        cen = lg - mean.view(1, -1, 1)
        sq = cen * cen
        var = (sq if m is None else sq * m).sum((0, 2)) / cnt     # biased, for normalising
        xhat = (cen * torch.rsqrt(var + bn.eps).view(1, -1, 1)).reshape(P, N)
        if bn_stats is not None:
            bn_stats.append((mean.detach(), var.detach(), cnt.detach()))
    else:
        xhat = (logits - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps)
    gate = torch.sigmoid(xhat * bn.weight + bn.bias)              # (P, N)
    if node_mask is not None:
        gate = gate * node_mask
    gate = gate / (gate.abs().sum(-1, keepdim=True) + EPS)        # l1norm over nodes
    vec = torch.bmm(gate.unsqueeze(1), nodes).squeeze(1)          # (P, s)
    return l2norm(vec)


def update_bn_per_caption(bn, stats, order):
    """The running stats after one BatchNorm update per caption, in caption order, in closed
    form: r_C = (1-m)^C r_0 + sum_c m (1-m)^(C-1-c) x_c (x = mean, and the unbiased variance)."""
    mean = torch.cat([s[0] for s in stats]).double()
    var = torch.cat([s[1] for s in stats]).double()
    cnt = torch.cat([s[2] for s in stats]).double()
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    perm = inv.to(mean.device)
    mean, var, cnt = mean[perm], var[perm], cnt[perm]
    var = var * cnt / (cnt - 1).clamp(min=1)
    C = mean.numel()
    with torch.no_grad():
        if bn.momentum is None:  # cumulative average, sequentially
            for c in range(C):
                k = float(bn.num_batches_tracked + 1)
                bn.running_mean.mul_(1 - 1 / k).add_(mean[c].to(bn.running_mean.dtype) / k)
                bn.running_var.mul_(1 - 1 / k).add_(var[c].to(bn.running_var.dtype) / k)
                bn.num_batches_tracked += 1
            return
        m = float(bn.momentum)
        w = m * (1 - m) ** torch.arange(C - 1, -1, -1, dtype=torch.float64, device=mean.device)
        keep = (1 - m) ** C
        rm = keep * bn.running_mean.double() + (w * mean).sum()
        rv = keep * bn.running_var.double() + (w * var).sum()
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn.num_batches_tracked += C


# ----------------------------------------------------------------------------- local nodes

class LocalSimilarity(torch.autograd.Function):
    """y = Linear((l2norm(attn @ V) - w)^2), the pre-normalisation local similarity vectors of
    Bi images against M words, with autograd but without a single d-sized tensor kept: forward
    and backward run over chunks of a few images (GRAD_ROWS word-pairs, small enough to stay in
    cache), and the backward recomputes each chunk's context from the attention (a K=R GEMM,
    ~15% of the projection's FLOPs) instead of reading saved ones. Autograd would keep three
    d-sized tensors per word-pair and run a dozen memory-bound passes over them.
    attn (Bi, M, R) attention over regions (may be a strided view), V (Bi, R, d) regions,
    words (M, d), weight (s, d), bias (s,) -> (Bi*M, s)."""

    @staticmethod
    def forward(ctx_, attn, V, words, weight, bias):
        dev = attn.device.type
        if torch.is_autocast_enabled(dev):  # under autocast: everything in its dtype
            dt = torch.get_autocast_dtype(dev)
            attn, V, words, weight, bias = (x.to(dt) for x in (attn, V, words, weight, bias))
            with torch.autocast(dev, enabled=False):
                return LocalSimilarity._forward(ctx_, attn, V, words, weight, bias)
        return LocalSimilarity._forward(ctx_, attn, V, words, weight, bias)

    @staticmethod
    def _forward(ctx_, attn, V, words, weight, bias):
        Bi, M, R = attn.shape
        d, s = V.size(2), weight.size(0)
        y = attn.new_empty(Bi, M, s)
        nrm = attn.new_empty(Bi, M, 1)
        step = max(1, min(Bi, GRAD_ROWS // M))
        buf = attn.new_empty(step, M, d)
        negw, wt = words.neg(), weight.t()
        for b0 in range(0, Bi, step):
            b1 = min(Bi, b0 + step)
            c = torch.bmm(attn[b0:b1], V[b0:b1], out=buf[:b1 - b0])     # (bc, M, d)
            n = torch.linalg.vector_norm(c, dim=2, keepdim=True, out=nrm[b0:b1])
            e = torch.addcmul(negw, c, (n + EPS).reciprocal_(), out=c)  # l2norm(ctx) - w
            torch.addmm(bias, e.square_().view(-1, d), wt, out=y[b0:b1].view(-1, s))
        ctx_.save_for_backward(attn, V, words, weight, nrm)
        return y.view(Bi * M, s)

    @staticmethod
    def backward(ctx_, dy):
        attn, V, words, weight, nrm = ctx_.saved_tensors
        Bi, M, R = attn.shape
        d, s = V.size(2), weight.size(0)
        dy = dy.contiguous().view(Bi, M, s)
        dattn, dV = torch.empty_like(attn), torch.empty_like(V)
        dwords = torch.zeros_like(words)
        dweight = torch.zeros_like(weight)
        step = max(1, min(Bi, GRAD_ROWS // M))
        cbuf, ebuf = attn.new_empty(step, M, d), attn.new_empty(step, M, d)
        for b0 in range(0, Bi, step):
            b1 = min(Bi, b0 + step)
            bc = b1 - b0
            a_c, V_c, n = attn[b0:b1], V[b0:b1], nrm[b0:b1]
            c = torch.bmm(a_c, V_c, out=cbuf[:bc])                     # context, recomputed
            inv = (n + EPS).reciprocal_()
            c.mul_(inv)                                                # c = l2norm(ctx)
            e = torch.sub(c, words, out=ebuf[:bc])                     # e = c - w
            dy_c = dy[b0:b1].view(bc * M, s)
            de = torch.mm(dy_c, weight)                                # (bc*M, d): dL/d(e^2)
            dweight.addmm_(dy_c.t(), e.square().view(bc * M, d))
            de = de.view(bc, M, d).mul_(e).mul_(2.0)                   # dL/de
            dwords.sub_(de.sum(0))
            dot = torch.linalg.vecdot(c, de, dim=2).unsqueeze(2)       # (bc, M, 1): c . dc
            # d l2norm: dc/(n + eps) - c (c . dc) / n
            dctx = de.mul_(inv).sub_(c.mul_(dot / n.clamp_min(1e-30)))
            torch.bmm(dctx, V_c.transpose(1, 2), out=dattn[b0:b1])
            torch.bmm(a_c.transpose(1, 2), dctx, out=dV[b0:b1])
        return dattn, dV, dwords, dweight, dy.sum((0, 1))


def cross_attention(V, W, lens=None, sc=None):
    """SCAN word-to-region attention of every (image, caption word): one GEMM, regions
    (B*R, d) against words (Cb*L, d), LeakyReLU, l2norm across each caption's words, softmax
    over regions of 9x. V (B, R, d), W (Cb, L, d), lens (Cb,) or None (all L words real).
    Returns (B, Cb*L, R), a strided view. With a Scratch `sc` (no autograd) it lives in a reused
    buffer and is the softmax's numerator only, exp(9 x scores), not divided by its sum over
    regions: `cross_nodes` normalises the context it gives (see there)."""
    B, R, d = V.shape
    Cb, L, _ = W.shape
    if sc is not None:
        attn = torch.mm(W.reshape(Cb * L, d), V.reshape(B * R, d).t(),
                        out=sc.get("attn", (Cb * L, B * R), V))
        F.leaky_relu_(attn, 0.1)
    else:
        attn = F.leaky_relu(W.reshape(Cb * L, d) @ V.reshape(B * R, d).t(), 0.1)
    attn = attn.view(Cb, L, B, R)
    if lens is not None:  # pad words out of the l2norm across words
        mask = word_mask(lens, L, V.device).view(Cb, L, 1, 1)
        attn = attn.mul_(mask) if sc is not None else attn * mask
    nrm = norm(attn, 1)                                           # (Cb, 1, B, R)
    if sc is not None:
        # in place; the scores lie in [-0.9, 9] after the l2norm, so exp needs no max shift.
        # The softmax's division is left out: cross_nodes l2-normalises the context anyway.
        attn.mul_(nrm.add_(EPS).reciprocal_().mul_(SMOOTH)).exp_()
    else:
        attn = torch.softmax(attn / (nrm + EPS) * SMOOTH, dim=3)  # over regions
    return attn.view(Cb * L, B, R).transpose(0, 1)                # (B, Cb*L, R)


def cross_nodes(attn, V, W, img_glo, cap_glo, lin_loc, lin_glo, sc=None, gram=None,
                neg_words=None):
    """Similarity nodes of every (image, caption) pair of a block, from its attention.
    attn (Bi, Cb*L, R), V (Bi, R, d) regions, W (Cb, L, d) words, img_glo (Bi, d),
    cap_glo (Cb, d). Returns nodes (Bi*Cb, N, s), pairs image-major, node 0 the global one.
    With a Scratch `sc` (no autograd) the big intermediates live in reused buffers, attn is
    cross_attention's unnormalised numerator, and `gram` (Bi, R, R) = V V^T and `neg_words`
    (Cb*L, d) = -W may be passed precomputed."""
    Bi, R, d = V.shape
    Cb, L, _ = W.shape
    s = lin_loc.out_features
    N = L + 1
    # context, l2-normalised, minus the word, squared, through sim_tranloc_w
    if sc is not None:
        # attn holds e = exp(9 x scores) (unnormalised, see cross_attention); the context is
        # ctx = e V / sum(e), and l2norm(ctx) = e V / (||e V|| + eps sum(e)) with
        # ||e V||^2 = e G e^T, G = V V^T the (R, R) Gram matrix of each image's regions: the
        # norms come from the (.., R)-sized attention, not from a pass over the d-sized
        # context. Then c - w = (e / (||e V|| + eps sum e)) V - w is one batched GEMM with
        # the negated words as its addend, squared in place and projected.
        M = Cb * L
        G = torch.bmm(V, V.transpose(1, 2)) if gram is None else gram   # (Bi, R, R)
        t = torch.bmm(attn, G, out=sc.get("eg", (Bi, M, R), V))
        n2 = torch.linalg.vecdot(t, attn, dim=2)                        # (Bi, M)
        den = attn.sum(2).mul_(EPS).add_(n2.sqrt_())
        sa = torch.div(attn, den.unsqueeze(2), out=sc.get("sa", (Bi, M, R), V))
        negw = W.reshape(M, d).neg() if neg_words is None else neg_words  # (M, d)
        x = torch.baddbmm(negw.unsqueeze(0), sa, V, out=sc.get("ctx", (Bi, M, d), V))
        loc = torch.addmm(lin_loc.bias, x.square_().view(Bi * M, d), lin_loc.weight.t(),
                          out=sc.get("loc", (Bi * M, s), V))
        nodes = sc.get("nodes", (Bi, Cb, N, s), V)
        torch.div(loc.view(Bi, Cb, L, s),
                  torch.linalg.vector_norm(loc, dim=1).add_(EPS).view(Bi, Cb, L, 1),
                  out=nodes[:, :, 1:])
    else:
        loc = LocalSimilarity.apply(attn, V, W.reshape(Cb * L, d),
                                    lin_loc.weight, lin_loc.bias)  # (Bi*Cb*L, s)
        loc = l2norm(loc).view(Bi, Cb, L, s)
    # the global node
    g = (img_glo.unsqueeze(1) - cap_glo.unsqueeze(0)).square()   # (Bi, Cb, d)
    g = l2norm(lin_glo(g))                                        # (Bi, Cb, s)
    if sc is not None:
        nodes[:, :, 0] = g
    else:
        nodes = torch.cat([g.unsqueeze(2), loc], 2)               # (Bi, Cb, N, s)
    return nodes.view(Bi * Cb, N, s)


def pair_nodes(V, W, img_glo, cap_glo, lin_loc, lin_glo, lens=None):
    """Similarity nodes of P given pairs: V (P, R, d), W (P, L, d), img_glo/cap_glo (P, d).
    Returns (P, N, s); autograd-friendly."""
    P, L, d = W.shape
    attn = F.leaky_relu(torch.bmm(W, V.transpose(1, 2)), 0.1)     # (P, L, R)
    if lens is not None:
        attn = attn * word_mask(lens, L, V.device).unsqueeze(2)
    attn = torch.softmax(l2norm(attn, dim=1) * SMOOTH, dim=2)     # over regions
    ctx = l2norm(torch.bmm(attn, V))                              # (P, L, d)
    loc = l2norm(lin_loc((ctx - W).square()))                     # (P, L, s)
    g = l2norm(lin_glo((img_glo - cap_glo).square()))             # (P, s)
    return torch.cat([g.unsqueeze(1), loc], 1)                    # (P, N, s)


# ----------------------------------------------------------------------------- drivers

def sgr_scorer(sgr_modules, lin_eval):
    """SGR's score of a block of pairs: scorer(nodes (P, N, s), node_mask (P, N) or None,
    n_img, sc) -> (P, 1), sigmoid(Linear(the final global node))."""
    weights = sgr_weights(sgr_modules)

    def scorer(nodes, node_mask, n_img, sc=None):
        vec = sgr_head(weights, nodes, node_mask, sc)
        return torch.sigmoid(torch.addmm(lin_eval.bias, vec, lin_eval.weight.t()))
    return scorer


def saf_scorer(saf, lin_eval, bn_stats=None):
    """SAF's score of a block of pairs (see sgr_scorer). In training its BatchNorm statistics
    are per caption (the block must hold all images of its captions, image-major) and are
    appended to `bn_stats`."""
    def scorer(nodes, node_mask, n_img, sc=None):
        vec = saf_head(saf, nodes, node_mask, n_img, bn_stats)
        return torch.sigmoid(torch.addmm(lin_eval.bias, vec, lin_eval.weight.t()))
    return scorer


def node_mask_of(lens, L, n_img, device):
    """(n_img*Cb, L+1) True on the global node and real words, pairs image-major."""
    m = torch.cat([torch.ones(len(lens), 1, dtype=torch.bool, device=device),
                   word_mask(lens, L, device)], 1)
    return m.unsqueeze(0).expand(n_img, -1, -1).reshape(n_img * len(lens), L + 1)


def similarity_matrix(img_emb, cap_emb, cap_lens, img_glo, cap_glo, lin_loc, lin_glo, scorer,
                      per_caption=False, block_order=None, scratch=None, word_pairs=None,
                      attn_words=None, out=None):
    """All (image, caption) scores: img_emb (B, R, d), cap_emb (C, L, d), their global vectors
    img_glo (B, d), cap_glo (C, d) -> (B, C). `lin_loc`, `lin_glo`: the Linear layers of the
    local and global similarity vectors; `scorer`: the head (sgr_scorer, saf_scorer).

    Works with and without autograd. `per_caption`: every block holds all images of its
    captions (SAF's per-caption BatchNorm in training); the captions' order of processing is
    appended to `block_order` (a list) when given. Without autograd the intermediates live in
    `scratch` (a Scratch, made here if None) and the result is written into `out` (B, C) if
    given."""
    B, R, d = img_emb.shape
    C = cap_emb.size(0)
    dev = img_emb.device
    # autocast does not take out= buffers: then the allocating path (as with autograd)
    grad = torch.is_grad_enabled() or torch.is_autocast_enabled(dev.type)
    sc = None if grad else (scratch if scratch is not None else Scratch())
    if word_pairs is None:
        word_pairs = WORD_PAIRS_GRAD if torch.is_grad_enabled() else WORD_PAIRS
    attn_words = ATTN_WORDS if attn_words is None else attn_words
    if out is None and not grad:
        out = torch.empty(B, C, dtype=img_emb.dtype, device=dev)
    gram = None if grad else torch.bmm(img_emb, img_emb.transpose(1, 2))  # (B, R, R)
    cols, order = [], []
    for L, idx, lens in length_blocks(cap_lens, B):
        idx_d = idx.to(dev)
        Wg = cap_emb.index_select(0, idx_d)[:, :L].contiguous()   # (Cg, L, d)
        Gg = cap_glo.index_select(0, idx_d)                       # (Cg, d)
        Cg = len(idx)
        if per_caption:  # all images of a caption in one block
            Cb, Bi = max(1, word_pairs // (B * L)), B
        else:  # the attention of many words at once, then image chunks
            Cb = max(1, min(Cg, attn_words // L))
            Bi = max(1, min(B, word_pairs // (Cb * L)))
        for c0 in range(0, Cg, Cb):
            c1 = min(c0 + Cb, Cg)
            lens_c = None if lens is None else lens[c0:c1]
            attn = cross_attention(img_emb, Wg[c0:c1], lens_c, sc)  # (B, Cb*L, R)
            negw = None if sc is None else Wg[c0:c1].reshape(-1, d).neg()
            blk = []
            for b0 in range(0, B, Bi):
                b1 = min(b0 + Bi, B)
                nodes = cross_nodes(attn[b0:b1], img_emb[b0:b1], Wg[c0:c1], img_glo[b0:b1],
                                    Gg[c0:c1], lin_loc, lin_glo, sc,
                                    None if gram is None else gram[b0:b1], negw)
                nm = None if lens_c is None else node_mask_of(lens_c, L, b1 - b0, dev)
                sims = scorer(nodes, nm, b1 - b0, sc).view(b1 - b0, c1 - c0)
                if grad:
                    blk.append(sims)
                else:
                    out[b0:b1].index_copy_(1, idx_d[c0:c1], sims)
            order.append(idx[c0:c1])
            if grad:
                cols.append(torch.cat(blk, 0))
    if block_order is not None:
        block_order.extend(order)
    if grad:
        order = torch.cat(order)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(C)
        res = torch.cat(cols, 1).index_select(1, inv.to(dev))    # (B, C)
        return res if out is None else out.copy_(res)
    return out


def pair_scores(img_emb, cap_emb, cap_lens, img_glo, cap_glo, img_idx, cap_idx, lin_loc, lin_glo,
                scorer):
    """Scores of the pairs (img_idx[p], cap_idx[p]), (P,), with autograd; for a scorer whose
    pairs are independent (SGR: SAF's training BatchNorm ties all images of a caption)."""
    lens = torch.as_tensor([int(x) for x in cap_lens], dtype=torch.int64)[cap_idx.cpu()]
    P = len(img_idx)
    parts, order = [], []
    for L in torch.unique(lens).tolist():
        sel = torch.nonzero(lens == L).squeeze(1)
        i, j = img_idx[sel.to(img_idx.device)], cap_idx[sel.to(cap_idx.device)]
        nodes = pair_nodes(img_emb[i], cap_emb[j, :L], img_glo[i], cap_glo[j], lin_loc, lin_glo)
        parts.append(scorer(nodes, None, None).squeeze(1))
        order.append(sel)
    order = torch.cat(order)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(P)
    return torch.cat(parts).index_select(0, inv.to(img_emb.device))  # (P,)


def subset_loss(img_emb, cap_emb, cap_lens, img_glo, cap_glo, lin_loc, lin_glo, scorer,
                loss_fn):
    """Any loss of the batch score matrix, for a scorer whose pairs are independent (SGR),
    with a graph only for the pairs whose score the loss's gradient touches.

    The encoders' outputs and the global vectors (img_glo, cap_glo: VisualSA's BatchNorm uses
    batch statistics) come with autograd; the B x B matrix S is scored without autograd; the
    loss and its gradient G = dloss/dS are taken on a detached copy of S; then only the pairs
    where G != 0 are recomputed with gradients, and `surrogate = sum G * s` has exactly the
    gradient of loss(S) with respect to every parameter (the chain rule through S). With the
    hinge and max-violation G has at most 3B non-zeros (positives, hardest negatives), so a
    step costs one no-grad pass over B x B pairs plus a training pass over a few hundred.
    Returns (loss value (detached), surrogate to backpropagate, S)."""
    args = (lin_loc, lin_glo, scorer)
    with torch.no_grad():
        scores = similarity_matrix(img_emb.detach(), cap_emb.detach(), cap_lens,
                                   img_glo.detach(), cap_glo.detach(), *args)  # (B, B)
    leaf = scores.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    img_idx, cap_idx = torch.nonzero(grad, as_tuple=True)
    if len(img_idx) == 0:  # no pair violates: no gradient reaches the model
        return loss.detach(), (img_glo.sum() + cap_glo.sum()) * 0.0, scores
    if len(img_idx) > DENSE_SUPPORT * grad.numel():
        # a dense gradient (e.g. DAA's, or the sum of violations early on): the batched
        # full-matrix pass with autograd is cheaper than pair by pair
        s_all = similarity_matrix(img_emb, cap_emb, cap_lens, img_glo, cap_glo, *args)
        return loss.detach(), (grad * s_all).sum(), scores
    s = pair_scores(img_emb, cap_emb, cap_lens, img_glo, cap_glo, img_idx, cap_idx, *args)
    return loss.detach(), (grad[img_idx, cap_idx] * s).sum(), scores
