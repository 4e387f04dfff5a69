"""GSMN (gsmn.py) against the original code's outputs (tests/fixtures/gsmn_ref/*): strict
checkpoint loading, the boxes as the original's loader passes them, evaluation similarities and
R@K, one training step (loss, pre-clip gradients, the state after Adam), and the vectorised
scoring against the literal per-caption graphs (caption lengths varied, dense and sparse, with
and without --gsmn_propagate)."""
import argparse
import json

import numpy as np
import pytest
import torch

import contract
import gsmn
from gsmn import GSMN
from helpers import assert_loads_as_recorded, assert_ranks_as_recorded, fixture_dir, load_fixture, named_params

FIXTURES = ["gsmn_dense_small_seed1", "gsmn_sparse_small_seed1"]
# zero gradient in exact arithmetic: the textual kernel scalars cancel in the normalisation over
# neighbours, and the out_2 biases shift every score alike (the hinge sees differences). The
# original's Adam moves them by about lr on float noise.
NOISE_ONLY = ("t2i_match_G.graph_convolution_3.params", "i2t_match_G.out_2.bias",
              "t2i_match_G.out_2.bias")

pytestmark = pytest.mark.usefixtures("one_thread")


def load_ckpt(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_gsmn(fixtures, name, dtype=torch.float32):
    """A fixture's model in `dtype`: (model, opt, checkpoint, its dependency arcs)."""
    model, opt, ckpt = load_fixture(fixtures, "gsmn_ref", name, GSMN)
    for m in model.modules():
        m.to(dtype)
    with open(fixture_dir(fixtures, "gsmn_ref", name) / "depends.json") as f:
        depends = json.load(f)
    return model, opt, ckpt, depends


# the original's model.params order and names (its text GRU is `rnn`)
PARTS = ("txt_enc", "img_enc", "i2t_match_G", "t2i_match_G")


def theirs(name):
    return name.replace("txt_enc.cap_rnn.", "txt_enc.rnn.")


# ----------------------------------------------------------------------------- 1. loading

@pytest.mark.parametrize("name", FIXTURES)
def test_strict_load(fixtures, name):
    model, opt, ckpt, _ = load_gsmn(fixtures, name)
    assert opt.is_sparse == ("sparse" in name)
    # the optimiser's parameters are the original's, in its order (Adam's state follows it)
    ts = np.load(fixture_dir(fixtures, "gsmn_ref", name) / "train_step.npz")
    assert_loads_as_recorded(model, ckpt, ts, PARTS, theirs)
    # the textual convolution's Linears have biases, the visual one's none (meta.json)
    assert model.t2i_match_G.graph_convolution_3.conv_weights[0].bias is not None
    assert model.i2t_match_G.graph_convolution_1.conv_weights[0].bias is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_weight_norm_is_the_original():
    """WeightNormLinear computes torch's old weight_norm (dim 0) from the same g and v."""
    torch.manual_seed(0)
    ours = gsmn.WeightNormLinear(7, 5)
    ours.weight_g.data.uniform_(0.5, 2)
    ref = torch.nn.Linear(7, 5)
    ref = torch.nn.utils.weight_norm(ref)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    assert list(ours.state_dict()) == ["bias", "weight_g", "weight_v"]


# ----------------------------------------------------------------------------- 2. boxes

@pytest.mark.parametrize("name", FIXTURES[:1])
def test_boxes_as_the_original_passes_them(fixtures, name):
    """The original's loader divides the boxes in place at every access: evaluation reads the
    split twice, so the rows are divided 10 times (float32: every row of an image shows the
    count at its batch's end); evalrank(fold5=False) hands image k the row of caption k (its
    boxes are image k // 5's). Training: a fresh dataset, divided once."""
    d = fixture_dir(fixtures, "gsmn_ref", name)
    inp, exp = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    ts = np.load(d / "train_step.npz")
    sizes = np.stack([inp["image_w"], inp["image_h"]], 1)
    n_cap = len(inp["captions"])
    counts = gsmn.original_eval_counts(n_cap, 5, batch_size=64)
    assert (counts == 10).all()
    per_caption = gsmn.inplace_divided(inp["bboxes"][np.arange(n_cap) // 5],
                                       sizes[np.arange(n_cap) // 5], counts)
    np.testing.assert_array_equal(per_caption.astype(np.float64), exp["bbox_per_caption"])
    np.testing.assert_array_equal(per_caption[:len(inp["images"])], exp["bbox_seen"])
    np.testing.assert_array_equal(gsmn.normalised_boxes(inp["bboxes"], sizes), exp["bbox_once"])
    once = gsmn.normalised_boxes(inp["bboxes"], sizes)[ts["train_ids"] // 5]
    np.testing.assert_array_equal(once, ts["train_bboxes"])


class OriginalBoxLoader:
    """The original data.py's box mechanics, for checking original_eval_counts: __getitem__
    divides a view of the box array in place, `torch.Tensor` of it shares memory with a
    float32 array (copies a float64 one), collate stacks after the batch's accesses, and
    encode_data reads the loader twice."""

    def __init__(self, boxes, sizes, im_div):
        self.bbox, self.sizes, self.im_div = boxes, sizes, im_div

    def item(self, index):
        img_id = index // self.im_div
        bboxes = self.bbox[img_id]
        w, h = self.sizes[img_id]
        for i in range(bboxes.shape[0]):
            bbox = bboxes[i]
            bbox[0] /= w
            bbox[1] /= h
            bbox[2] /= w
            bbox[3] /= h
            bboxes[i] = bbox
        return torch.from_numpy(bboxes) if bboxes.dtype == np.float32 else \
            torch.tensor(bboxes, dtype=torch.float32)

    def encode(self, n, batch_size):
        out = np.zeros((n,) + self.bbox.shape[1:])
        for _ in range(2):  # the max-length pass, then the encoding pass
            for b0 in range(0, n, batch_size):
                items = [self.item(i) for i in range(b0, min(n, b0 + batch_size))]
                out[b0:b0 + len(items)] = torch.stack(items).numpy()
        return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_cap,batch_size", [(50, 64), (60, 16), (35, 7)])
def test_original_eval_counts(dtype, n_cap, batch_size):
    rng = np.random.default_rng(0)
    n_img = n_cap // 5
    boxes = rng.uniform(0, 300, (n_img, 3, 4)).astype(dtype)
    sizes = rng.integers(200, 600, (n_img, 2)).astype(np.float64)
    ref = OriginalBoxLoader(boxes.copy(), sizes, 5).encode(n_cap, batch_size)
    counts = gsmn.original_eval_counts(n_cap, 5, batch_size, memory_shared=dtype == np.float32)
    ours = gsmn.inplace_divided(boxes[np.arange(n_cap) // 5], sizes[np.arange(n_cap) // 5],
                                counts).astype(np.float32)
    np.testing.assert_array_equal(ours.astype(np.float64), ref)


# ----------------------------------------------------------------------------- 3. evaluation

@pytest.mark.parametrize("name", FIXTURES)
def test_evaluation(fixtures, name):
    model, opt, ckpt, depends = load_gsmn(fixtures, name)
    d = fixture_dir(fixtures, "gsmn_ref", name)
    inp, exp = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    model.val_start()
    lens = inp["lengths"].tolist()
    with torch.no_grad():  # inputs hold each image once (caption j is of image j // 5)
        img, cap, _ = model.forward_emb(torch.from_numpy(inp["images"]),
                                        torch.from_numpy(inp["captions"]), lens)
        np.testing.assert_allclose(img.numpy(), exp["img_embs"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(cap.numpy(), exp["cap_embs"], atol=1e-6, rtol=0)
        seen = torch.from_numpy(exp["bbox_seen"])  # the boxes the original's model received
        fast = model.forward_sim(img, cap, lens, seen, depends).double().numpy()
        literal = model.forward_sim_percaption(img, cap, lens, seen, depends).double().numpy()
        once = model.forward_sim(img, cap, lens, torch.from_numpy(exp["bbox_once"]),
                                 depends).double().numpy()
    np.testing.assert_allclose(once, exp["sims_bbox_once"], atol=1e-5, rtol=0)
    for sims in (fast, literal):
        np.testing.assert_allclose(sims, exp["sims"], atol=1e-5, rtol=0)
        assert_ranks_as_recorded(sims, exp)
    loss = model.criterion(torch.from_numpy(fast[:, ::5].copy()))
    assert abs(loss.item() - float(exp["loss_square"])) < 1e-4


# ----------------------------------------------------------------------------- 4. train step

def train_batch(fixtures, name):
    ts = np.load(fixture_dir(fixtures, "gsmn_ref", name) / "train_step.npz")
    lens = ts["train_lengths"].tolist()
    return ts, (torch.from_numpy(ts["train_images"]),
                torch.from_numpy(ts["train_captions"][:, :max(lens)]), lens)


@pytest.mark.parametrize("name", FIXTURES)
def test_train_step(fixtures, name, monkeypatch):
    model, opt, _, depends = load_gsmn(fixtures, name)
    ts, (images, captions, lens) = train_batch(fixtures, name)
    boxes = torch.from_numpy(ts["train_bboxes"])
    deps = [depends[i] for i in ts["train_ids"]]
    model.train_start()
    with torch.no_grad():
        img, cap, _ = model.forward_emb(images, captions, lens)
        sims = model.forward_sim(img, cap, lens, boxes, deps)
    np.testing.assert_allclose(sims.numpy(), ts["sims_train"], atol=1e-5, rtol=0)

    seen = {}
    clip = contract.clip_grad_norm_

    def spy(params, max_norm):
        seen["grads"] = {id(p): p.grad.detach().clone() for p in params}
        seen["norm"] = float(clip(params, max_norm))
        return seen["norm"]
    monkeypatch.setattr(contract, "clip_grad_norm_", spy)
    named = dict(named_params(model, PARTS, theirs))
    before = {n: p.detach().clone() for n, p in named.items()}
    loss = model.train_emb(images, captions, lens, boxes=boxes, depends=deps)
    assert abs(float(loss) - float(ts["loss"])) <= 1e-5 * abs(float(ts["loss"]))
    assert abs(seen["norm"] - float(ts["grad_norm"])) <= 1e-5 * float(ts["grad_norm"])
    names = list(ts["param_names"])
    ref = {n: ts["grad/" + n].astype(np.float64) for n in names}
    total = np.sqrt(sum((g ** 2).sum() for g in ref.values()))
    for n in names:
        err = np.linalg.norm(seen["grads"][id(named[n])].double().numpy() - ref[n])
        assert err <= 1e-4 * np.linalg.norm(ref[n]) + 1e-6 * total, (n, err)

    # the clipped Adam step, where the gradient is not float noise at the scale of Adam's eps
    # (its first step moves each entry by lr g / (|g| + 1e-8)); noise-only parameters aside
    after = load_ckpt(str(fixture_dir(fixtures, "gsmn_ref", name) / "after_step.pth.tar"))["model"]
    after_params = {}
    for prefix, sd in zip(["img_enc.", "txt_enc.", "i2t_match_G.", "t2i_match_G."], after,
                          strict=True):
        after_params.update({prefix + k: v for k, v in sd.items()})
    coef = min(1.0, opt.grad_clip / (float(ts["grad_norm"]) + 1e-6))
    lr = opt.learning_rate
    for n in names:
        if n in NOISE_ONLY:
            continue
        clear = torch.from_numpy(np.abs(ref[n]) * coef > 1e-6)
        moved, ref_moved = named[n].detach() - before[n], after_params[n] - before[n]
        assert clear.float().mean() > 0.5, n
        torch.testing.assert_close(moved[clear], ref_moved[clear], rtol=0, atol=0.02 * lr,
                                   msg=n)


def test_train_gradients_fast_equal_literal(fixtures):
    """In float64 the training step's gradients through the fast path equal those through the
    literal per-caption graphs (exact algebra, not an approximation)."""
    name = FIXTURES[1]
    model, opt, _, depends = load_gsmn(fixtures, name, torch.float64)
    ts, (images, captions, lens) = train_batch(fixtures, name)
    boxes = torch.from_numpy(ts["train_bboxes"]).double()
    deps = [depends[i] for i in ts["train_ids"]]
    model.train_start()
    grads = []
    for fn in (model.forward_sim, model.forward_sim_percaption):
        for p in model.params:
            p.grad = None
        img, cap, _ = model.forward_emb(images.double(), captions, lens)
        model.criterion(fn(img, cap, lens, boxes, deps)).backward()
        grads.append({n: (p.grad if p.grad is not None else torch.zeros_like(p))
                      for n, p in named_params(model, PARTS, theirs)})
    for n in grads[0]:
        if n in NOISE_ONLY:
            continue
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12, msg=n)


# ----------------------------------------------------------------------------- 5. fast path

def random_model(dtype, **kw):
    opt = argparse.Namespace(img_dim=24, embed_size=32, word_dim=12, vocab_size=40,
                             num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False,
                             feat_dim=8, num_block=8, hid_dim=16, out_dim=1,
                             lambda_softmax=9.0, is_sparse=False, gsmn_propagate=False,
                             margin=0.2, max_violation=True, grad_clip=2.0,
                             learning_rate=2e-4, device="cpu")
    for k, v in kw.items():
        setattr(opt, k, v)
    torch.manual_seed(3)
    model = GSMN(opt)
    for m in model.modules():
        m.to(dtype)
        for p in m.parameters():  # away from the init, so that no term is negligible
            p.data.add_(0.3 * torch.randn_like(p))
    conv = model.i2t_match_G.graph_convolution_1
    for p in (conv.precision_rho, conv.precision_theta):  # no kernel of width ~0 (0/0 = NaN)
        p.data.abs_().add_(0.3)
    model.val_start()
    return model


def random_inputs(dtype, n_img=7, n_cap=23, seed=0, d=32):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 13, (n_cap,), generator=g).tolist()
    lens[0], lens[1] = 12, 1
    img = torch.nn.functional.normalize(torch.randn(n_img, 36, d, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, 12, d, generator=g), dim=-1)
    cap = cap * (torch.arange(12)[None, :] < torch.tensor(lens)[:, None])[:, :, None]
    xy = torch.rand(n_img, 36, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + 0.3 * torch.rand(n_img, 36, 2, generator=g)], 2)
    deps = []
    for L in lens:  # ROOT arc, random arcs, some past the caption's end, a self-loop
        arcs = [[0, int(torch.randint(0, L + 2, (1,), generator=g))]]
        arcs += [[int(a), int(b)] for a, b in torch.randint(0, L + 2, (L, 2), generator=g)]
        deps.append(arcs + [[L - 1, L - 1]])
    return img.to(dtype), cap.to(dtype), lens, boxes.to(dtype), deps


@pytest.mark.parametrize("d,n", [(32, 8), (80, 2)])
@pytest.mark.parametrize("propagate", [False, True])
@pytest.mark.parametrize("is_sparse", [False, True])
def test_fast_equals_literal(is_sparse, propagate, d, n):
    """The vectorised scores equal the original per-caption loop's, in float32 within 1e-5
    and in float64 within 1e-12, with caption lengths 1..12 in small blocks (several
    caption and image chunks) and large ones; chunks narrower than the 36 regions (the t2i
    context norms from the contexts) and wider (from the regions' Gram matrices)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = random_model(dtype, is_sparse=is_sparse, gsmn_propagate=propagate,
                             embed_size=d, num_block=n, feat_dim=n)
        img, cap, lens, boxes, deps = random_inputs(dtype, d=d)
        with torch.no_grad():
            ref = model.forward_sim_percaption(img, cap, lens, boxes, deps)
            for kw in ({}, {"block_elems": 2000, "img_chunk": 3}):
                fast = model.forward_sim(img, cap, lens, boxes, deps, **kw)
                torch.testing.assert_close(fast, ref, rtol=0, atol=tol)


def test_dense_equals_sparse_released():
    """The spec's finding: in the released code dense and sparse give the same scores (the
    word graph acts on each word's own vector), unless an arc is a self-loop."""
    img, cap, lens, boxes, deps = random_inputs(torch.float64)
    no_loops = [[a for a in arcs if a[0] != a[1]] for arcs in deps]
    with torch.no_grad():
        dense = random_model(torch.float64).forward_sim(img, cap, lens, boxes)
        sparse = random_model(torch.float64, is_sparse=True)
        torch.testing.assert_close(sparse.forward_sim(img, cap, lens, boxes, no_loops), dense,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(sparse.forward_sim(img, cap, lens, boxes, None), dense,
                                   rtol=0, atol=1e-12)
        assert (sparse.forward_sim(img, cap, lens, boxes, deps) - dense).abs().max() > 1e-4


def test_one_image():
    """A one-image shard (the original's squeeze crashed there)."""
    model = random_model(torch.float32)
    img, cap, lens, boxes, deps = random_inputs(torch.float32, n_img=1, n_cap=3)
    with torch.no_grad():
        ref = model.forward_sim_percaption(img, cap, lens, boxes)
        assert ref.shape == (1, 3)
        torch.testing.assert_close(model.forward_sim(img, cap, lens, boxes), ref, rtol=0,
                                   atol=1e-5)


def test_arc_adjacency_and_validation():
    adj = gsmn.arc_adjacency([[0, 2], [2, 1], [2, 3], [1, 5]], 4).numpy()
    expected = np.eye(4)
    expected[2, 1] = expected[1, 2] = expected[2, 3] = expected[3, 2] = 1
    np.testing.assert_array_equal(adj, expected)  # ROOT skipped, [1, 5] past the end dropped
    assert gsmn.validate_arcs([[[0, 1]], [[0, 2], [2, 1]]], 2, "x") is None
    assert "2 arc lists for 3 captions" in gsmn.validate_arcs([[], []], 3, "x")
    assert "negative" in gsmn.validate_arcs([[[0, 1], [1, -1]]], 1, "x")
    assert "pair" in gsmn.validate_arcs([[[0, 1, 2]]], 1, "x")
    assert "pair" in gsmn.validate_arcs([[[0, 1.5]]], 1, "x")
