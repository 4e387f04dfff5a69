"""The fast similarity (similarity.py) against the per-caption reference
(`EncoderSimilarity.forward_percaption`), on random inputs with very unequal caption lengths."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import similarity
from evaluation import shard_attn_scores
from loss import ContrastiveLoss
from model import SGRAF, EncoderSimilarity, l2norm

D, S = 32, 16


def make_inputs(n_img, n_cap, seed=0, lo=2, hi=60):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n_cap,), generator=g)
    lens[0], lens[-1] = hi, lo
    img = l2norm(torch.randn(n_img, 36, D, generator=g))
    cap = l2norm(torch.randn(n_cap, hi, D, generator=g))
    cap = cap * (torch.arange(hi)[None, :, None] < lens[:, None, None])  # zero padded
    return img, cap, lens.tolist()


def make_sim(module, seed=0, train=False):
    torch.manual_seed(seed)
    sim = EncoderSimilarity(D, S, module)
    with torch.no_grad():  # non-trivial BatchNorm parameters and running stats
        for m in sim.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    sim.train(train)
    for m in sim.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return sim


def sgraf_with(sim):
    """A SGRAF model (small encoders) whose similarity encoder is `sim`."""
    opt = SimpleNamespace(img_dim=8, embed_size=D, word_dim=4, vocab_size=10, num_layers=1,
                          bi_gru=True, no_imgnorm=False, no_txtnorm=False,
                          module_name=sim.module_name, sim_dim=S, sgr_step=3, grad_clip=2.0,
                          margin=0.2, max_violation=True, learning_rate=1e-3, device="cpu")
    model = SGRAF(opt)
    model.sim_enc = sim
    return model


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Small chunks, so that images are split too and the scratch buffers are reused."""
    monkeypatch.setattr(similarity, "WORD_PAIRS", 64)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
@pytest.mark.parametrize("min_pairs", [1, 10 ** 6])  # equal-length blocks; one padded block
def test_eval_matches_percaption(module, min_pairs, monkeypatch):
    monkeypatch.setattr(similarity, "MIN_BLOCK_PAIRS", min_pairs)
    sim = make_sim(module)
    img, cap, lens = make_inputs(5, 13)
    with torch.no_grad():
        ref = sim.forward_percaption(img, cap, lens)
        for word_pairs in (64, 4096):
            got = sim(img, cap, lens, word_pairs=word_pairs)
            assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("module", ["SGR", "SAF"])
@pytest.mark.parametrize("shard_size", [4, None])  # 4 divides neither 10 nor 23
def test_shard_attn_scores(module, shard_size, tiny_blocks):
    sim = make_sim(module)
    img, cap, lens = make_inputs(10, 23, seed=1)
    model = sgraf_with(sim)
    with torch.no_grad():
        ref = sim.forward_percaption(img, cap, lens).double().numpy()
    got = shard_attn_scores(model, img.numpy(), cap.numpy(), lens, SimpleNamespace(),
                            shard_size=shard_size)
    assert got.shape == (10, 23) and got.dtype == np.float64
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_train_matches_percaption(module):
    """Training mode: sims, every parameter's gradient and the BatchNorm running stats (SAF's
    updated once per caption, VisualSA's once per call)."""
    ref_sim = make_sim(module, train=True)
    sim = copy.deepcopy(ref_sim)
    img, cap, lens = make_inputs(6, 9, seed=2)
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    ref = ref_sim.forward_percaption(img, cap, lens)
    got = sim(img, cap, lens)
    assert (got - ref).abs().max().item() <= 1e-5
    (ref * w).sum().backward()
    (got * w).sum().backward()
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref_sim.parameters()))
    for (name, p), q in zip(ref_sim.named_parameters(), sim.parameters()):
        g = q.grad if q.grad is not None else torch.zeros_like(q)  # folded SGR key bias
        assert (g - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6 * total, name
    for (name, a), b in zip(ref_sim.named_buffers(), sim.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7), name


def test_saf_bn_running_stats_closed_form():
    """The closed form of C sequential momentum updates, against BatchNorm itself."""
    bn = torch.nn.BatchNorm1d(1)
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(1.7)
    ref = copy.deepcopy(bn)
    xs = [torch.randn(4, 1, n) for n in (3, 7, 2, 5)]
    for x in xs:
        ref(x)
    stats = [(x.mean().view(1), x.var(unbiased=False).view(1),
              torch.tensor([float(x.numel())])) for x in xs]
    similarity.update_bn_per_caption(bn, stats, torch.arange(4))
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-7)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-7)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 4


@pytest.mark.parametrize("dense", [0.0, 1.01])  # whole-matrix recompute; pair by pair
def test_max_violation_subset_matches_full_graph(dense, monkeypatch):
    monkeypatch.setattr(similarity, "DENSE_SUPPORT", dense)
    """The SGR hinge loss from the chosen pairs only: same value and gradients as the
    full-graph loss (encoder outputs and VisualSA's batch BatchNorm included)."""
    ref_sim = make_sim("SGR", seed=4, train=True)
    sim = copy.deepcopy(ref_sim)
    img, cap, lens = make_inputs(8, 8, seed=5, lo=3, hi=12)
    img_a, cap_a = img.clone().requires_grad_(), cap.clone().requires_grad_()
    img_b, cap_b = img.clone().requires_grad_(), cap.clone().requires_grad_()
    ref = ContrastiveLoss(margin=0.2, max_violation=True)(
        ref_sim.forward_percaption(img_a, cap_a, lens))
    got, surrogate, _ = sim(img_b, cap_b, lens,
                                  loss_fn=ContrastiveLoss(margin=0.2, max_violation=True))
    assert abs(got.item() - ref.item()) <= 1e-5
    ref.backward()
    surrogate.backward()
    pairs = [(img_a, img_b), (cap_a, cap_b)] + [
        (p, q) for p, q in zip(ref_sim.parameters(), sim.parameters())]
    total = torch.sqrt(sum(a.grad.pow(2).sum() for a, _ in pairs))
    for a, b in pairs:
        g = b.grad if b.grad is not None else torch.zeros_like(b)
        assert (g - a.grad).norm() <= 1e-4 * a.grad.norm() + 1e-6 * total
    for a, b in zip(ref_sim.buffers(), sim.buffers()):  # VisualSA's BN updated once
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7)


def test_bf16_autocast_runs():
    sim = make_sim("SGR")
    img, cap, lens = make_inputs(4, 7, seed=6)
    model = sgraf_with(sim)
    with torch.no_grad():
        ref = sim.forward_percaption(img, cap, lens).double().numpy()
    got = shard_attn_scores(model, img.numpy(), cap.numpy(), lens,
                            SimpleNamespace(precision="bf16"))
    assert np.abs(got - ref).max() <= 2e-2


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_eval_one_image_chunks(module, monkeypatch):
    """No-grad path with one image per chunk and padded blocks: the Gram-matrix context norms
    and the unnormalised attention give the same scores."""
    monkeypatch.setattr(similarity, "WORD_PAIRS", 1)
    monkeypatch.setattr(similarity, "MIN_BLOCK_PAIRS", 40)
    sim = make_sim(module)
    img, cap, lens = make_inputs(5, 11, seed=7, lo=2, hi=20)
    with torch.no_grad():
        ref = sim.forward_percaption(img, cap, lens)
        got = sim(img, cap, lens)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grad_rows", [1, 10, 10 ** 6])  # one image per chunk ... all at once
def test_local_nodes_function(grad_rows, monkeypatch):
    """LocalNodes (chunked forward, recomputing backward) against plain autograd, with a
    strided attention view as cross_attention gives: nodes [global, l2norm(Linear((l2norm(
    attn @ V) - w)^2))] and the gradients of every input."""
    monkeypatch.setattr(similarity, "GRAD_ROWS", grad_rows)
    g = torch.Generator().manual_seed(8)
    Bi, Cb, L, R, d, s = 5, 2, 3, 36, D, S
    M = Cb * L
    attn = torch.softmax(torch.randn(M, Bi, R, generator=g) * 3, 2).transpose(0, 1)
    V = l2norm(torch.randn(Bi, R, d, generator=g))
    words = l2norm(torch.randn(M, d, generator=g))
    weight, bias = torch.randn(s, d, generator=g), torch.randn(s, generator=g)
    glo = l2norm(torch.randn(Bi * Cb, s, generator=g))
    ins = [x.clone().requires_grad_() for x in (attn, V, words, weight, bias, glo)]
    ref_ins = [x.clone().requires_grad_() for x in (attn, V, words, weight, bias, glo)]
    dy = torch.randn(Bi * Cb, L + 1, s, generator=g)
    got = similarity.LocalNodes.apply(*ins, L)
    a, v, w, wt, b, gl = ref_ins
    loc = l2norm(torch.nn.functional.linear((l2norm(torch.bmm(a, v)) - w).square(), wt, b))
    ref = torch.cat([gl.view(Bi * Cb, 1, s), loc.reshape(Bi * Cb, L, s)], 1)
    assert (got - ref).abs().max().item() <= 1e-5
    got.backward(dy)
    ref.backward(dy)
    for x, y in zip(ins, ref_ins):
        assert (x.grad - y.grad).abs().max().item() <= 1e-4 * y.grad.abs().max().item() + 1e-6


@pytest.mark.parametrize("head_rows", [1, 20, 10 ** 6])  # one pair per chunk ... all at once
@pytest.mark.parametrize("masked", [False, True])
def test_sgr_head_function(head_rows, masked, monkeypatch):
    """SGRHead (the hand-written backward of SGR's reasoning and score) against autograd over
    sgr_head: scores and the gradients of the nodes and of every parameter."""
    monkeypatch.setattr(similarity, "HEAD_ROWS", head_rows)
    torch.manual_seed(9)
    P, N = 23, 7
    sim = make_sim("SGR", seed=9, train=True)
    with torch.no_grad():
        for p in sim.SGR_module.parameters():  # biases too, so that none is trivially zero
            p.normal_(0, 0.3)
    nodes = torch.randn(P, N, S).requires_grad_()
    mask = None
    if masked:
        lens = torch.randint(1, N, (P,))
        mask = torch.cat([torch.ones(P, 1, dtype=torch.bool),
                          torch.arange(N - 1)[None] < lens[:, None]], 1)
    params = [nodes] + list(sim.SGR_module.parameters()) + list(sim.sim_eval_w.parameters())
    w = torch.randn(P, 1)
    ref = torch.sigmoid(sim.sim_eval_w(similarity.sgr_head(
        similarity.sgr_weights(sim.SGR_module), nodes, mask)))
    ref_g = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    got = sim.scorer()(nodes, mask, None)
    got_g = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    assert (got - ref).abs().max().item() <= 1e-6
    for a, b in zip(got_g, ref_g):
        if b is None:  # the folded key bias: outside both graphs
            assert a is None
            continue
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7


@pytest.mark.parametrize("masked", [False, True])
def test_saf_head_function(masked):
    """SAFHead (the hand-written backward of SAF's filtration with per-caption BatchNorm
    statistics) against autograd over saf_head: scores, statistics and the gradients of the
    nodes and of every parameter."""
    torch.manual_seed(10)
    n_img, Cb, N = 4, 3, 6
    P = n_img * Cb
    sim = make_sim("SAF", seed=10, train=True)
    nodes = torch.randn(P, N, S).requires_grad_()
    mask = None
    if masked:
        lens = torch.randint(1, N, (Cb,))
        mask = similarity.node_mask_of(lens, N - 1, n_img, "cpu")
    params = [nodes] + list(sim.SAF_module.parameters()) + list(sim.sim_eval_w.parameters())
    w = torch.randn(P, 1)
    ref_stats, stats = [], []
    ref = torch.sigmoid(sim.sim_eval_w(similarity.saf_head(sim.SAF_module, nodes, mask, n_img,
                                                           ref_stats)))
    ref_g = torch.autograd.grad((ref * w).sum(), params)
    got = sim.scorer(stats)(nodes, mask, n_img)
    got_g = torch.autograd.grad((got * w).sum(), params)
    assert (got - ref).abs().max().item() <= 1e-6
    for a, b in zip(stats[0], ref_stats[0]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(got_g, ref_g):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7


@pytest.mark.parametrize("bi_gru", [True, False])
def test_packed_gru_matches_nn_gru(bi_gru):
    """EncoderText's training GRU (model.PackedGRU, a written-out backward) against nn.GRU with
    autograd: outputs and the gradients of every parameter, captions in any order, lengths
    down to 1."""
    from model import EncoderText
    torch.manual_seed(11)
    enc = EncoderText(30, 8, D, 1, use_bi_gru=bi_gru)
    enc.dropout.eval()
    lens = [5, 1, 7, 3, 7, 2]
    caps = torch.randint(0, 30, (len(lens), max(lens)))
    w = torch.randn(len(lens), max(lens), D)
    got = enc(caps, lens)
    got_g = torch.autograd.grad((got * w).sum(), list(enc.parameters()))
    rnn_forward = enc.cap_rnn.forward
    x = enc.embed(caps)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lens), batch_first=True,
                                                     enforce_sorted=False)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(rnn_forward(packed)[0], batch_first=True)
    if bi_gru:
        out = (out[:, :, :D] + out[:, :, D:]) / 2
    ref = l2norm(out)
    ref_g = torch.autograd.grad((ref * w).sum(), list(enc.parameters()))
    assert (got - ref).abs().max().item() <= 1e-6
    for a, b in zip(got_g, ref_g):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7
