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
from contract import l2norm
from model import SGRAF, EncoderSimilarity

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
    """--precision bf16 really scores in bf16: further from the fp32 reference than fp32's
    own rounding (bf16 keeps 8 bits of mantissa: ~1e-3 here), within the stated tolerance."""
    sim = make_sim("SGR")
    img, cap, lens = make_inputs(4, 7, seed=6)
    model = sgraf_with(sim)
    with torch.no_grad():
        ref = sim.forward_percaption(img, cap, lens).double().numpy()
    got = shard_attn_scores(model, img.numpy(), cap.numpy(), lens,
                            SimpleNamespace(precision="bf16"))
    fp32 = shard_attn_scores(model, img.numpy(), cap.numpy(), lens,
                             SimpleNamespace(precision="fp32"))
    assert np.abs(fp32 - ref).max() <= 1e-5
    assert 1e-4 < np.abs(got - ref).max() <= 2e-2


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
def test_local_similarity_function(grad_rows, monkeypatch):
    """LocalSimilarity (chunked forward, recomputing backward) against plain autograd, with a
    strided attention view as cross_attention gives."""
    monkeypatch.setattr(similarity, "GRAD_ROWS", grad_rows)
    g = torch.Generator().manual_seed(8)
    Bi, M, R, d, s = 5, 6, 36, D, S
    attn = torch.softmax(torch.randn(M, Bi, R, generator=g) * 3, 2).transpose(0, 1)
    V = l2norm(torch.randn(Bi, R, d, generator=g))
    words = l2norm(torch.randn(M, d, generator=g))
    weight, bias = torch.randn(s, d, generator=g), torch.randn(s, generator=g)
    ins = [x.clone().requires_grad_() for x in (attn, V, words, weight, bias)]
    ref_ins = [x.clone().requires_grad_() for x in (attn, V, words, weight, bias)]
    dy = torch.randn(Bi * M, s, generator=g)
    got = similarity.LocalSimilarity.apply(*ins)
    a, v, w, wt, b = ref_ins
    ref = torch.nn.functional.linear((l2norm(torch.bmm(a, v)) - w).square(), wt, b)
    assert (got - ref.reshape(Bi * M, s)).abs().max().item() <= 1e-5
    got.backward(dy)
    ref.reshape(Bi * M, s).backward(dy)
    for x, y in zip(ins, ref_ins):
        assert (x.grad - y.grad).abs().max().item() <= 1e-4 * y.grad.abs().max().item() + 1e-6
