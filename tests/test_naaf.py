"""NAAF (naaf.py) against the original code's outputs (tests/fixtures/naaf_ref/*): strict
checkpoint loading, evaluation similarities and R@K, one training step with its threshold
updates, the threshold learner caption by caption, and the vectorised evaluation path against
the per-caption reference."""
import argparse

import numpy as np
import pytest
import torch

import contract
import matchers
import naaf
from checkpoint import load_checkpoint
from helpers import assert_loads_as_recorded, assert_ranks_as_recorded, fixture_dir, load_fixture, named_params
from naaf import NAAF

FIXTURES = ["naaf_small_seed1", "naaf_glove_small_seed1"]


pytestmark = pytest.mark.usefixtures("one_thread")


class LoggedOpt(argparse.Namespace):
    """A Namespace that records every assignment to a threshold-state field, in order."""

    def __init__(self, **kw):
        object.__setattr__(self, "log", [])
        super().__init__(**{str(k): v for k, v in kw.items()})

    def __setattr__(self, k, v):
        if k in naaf.THRESHOLD_STATE:
            self.log.append((k, float(v)))
        super().__setattr__(k, v)


PARTS = ("txt_enc", "img_enc")  # the original's model.params order


def theirs(name):
    return name.replace("txt_enc.cap_rnn.", "txt_enc.rnn.")


# ----------------------------------------------------------------------------- 1. loading

@pytest.mark.parametrize("name", FIXTURES)
def test_strict_load(fixtures, name):
    model, opt, ckpt = load_fixture(fixtures, "naaf_ref", name, NAAF)
    assert matchers.recognise(ckpt, name) == "NAAF"
    assert opt.precomp_enc_text_type == ("GloVe" if "glove" in name else "basic")
    # the optimiser's parameters are the original's, in its order (GloVe table included)
    ts = np.load(fixture_dir(fixtures, "naaf_ref", name) / "train_step.npz")
    assert_loads_as_recorded(model, ckpt, ts, PARTS, theirs)


def test_not_naaf_checkpoints():
    opt = argparse.Namespace(thres_safe=0.0)
    sd_img, sd_txt = {"fc.weight": 0}, {"rnn.weight_ih_l0": 0}
    assert NAAF.recognise({"model": [sd_img, sd_txt, {}], "opt": opt}) is None  # SGRAF
    assert NAAF.recognise({"model": [sd_img, sd_txt],
                           "opt": argparse.Namespace()}) is None              # SCAN
    assert NAAF.recognise({"model": [sd_img, sd_txt], "opt": opt}) == "NAAF"


# ----------------------------------------------------------------------------- 2. evaluation

@pytest.mark.parametrize("name", FIXTURES)
def test_evaluation(fixtures, name):
    model, opt, ckpt = load_fixture(fixtures, "naaf_ref", name, NAAF)
    d = fixture_dir(fixtures, "naaf_ref", name)
    inp, exp = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    assert opt.thres_safe == float(exp["thres_safe_used"])
    model.val_start()
    with torch.no_grad():  # inputs hold each image once (caption j is of image j // 5)
        img = model.img_enc(torch.from_numpy(inp["images"]))
        lens = inp["lengths"].tolist()
        cap = model.txt_enc(torch.from_numpy(inp["captions"]), lens)
    np.testing.assert_allclose(img.numpy(), exp["img_embs"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(cap.numpy(), exp["cap_embs"], atol=1e-6, rtol=0)
    # the original evaluates float64 copies of the embeddings; float32 is the fast path
    for dtype in (torch.float64, torch.float32):
        sims = model.forward_sim(img.to(dtype), cap.to(dtype), lens).numpy()
        assert sims.shape == (10, 50) and sims.dtype == np.float64
        np.testing.assert_allclose(sims, exp["sims"], atol=1e-5, rtol=0)
        assert_ranks_as_recorded(sims, exp)
    loss = model.criterion(torch.from_numpy(sims[:, ::5].copy()))
    assert abs(loss.item() - float(exp["loss_square"])) < 1e-4


# ----------------------------------------------------------------------------- 3. train step

def spy_clip(monkeypatch):
    seen = {}
    clip = contract.clip_grad_norm_  # the base class's train step clips

    def spy(params, max_norm):
        seen["grads"] = {id(p): p.grad.detach().clone() for p in params}
        seen["norm"] = float(clip(params, max_norm))
        return seen["norm"]
    monkeypatch.setattr(contract, "clip_grad_norm_", spy)
    return seen


@pytest.mark.parametrize("name", FIXTURES)
def test_train_step(fixtures, name, monkeypatch):
    model, opt, _ = load_fixture(fixtures, "naaf_ref", name, NAAF, LoggedOpt)
    d = fixture_dir(fixtures, "naaf_ref", name)
    inp, ts = np.load(d / "inputs.npz"), np.load(d / "train_step.npz")
    keys = list(ts["thres_state_keys"])
    np.testing.assert_array_equal([getattr(opt, k) for k in keys], ts["thres_before"])
    ci = ts["train_caption_index"]
    lens = inp["lengths"][ci]
    captions = torch.from_numpy(inp["captions"][ci][:, :int(lens.max())])

    # the training score with the checkpoint's opt.thres (caption 0) then the resets
    probe = argparse.Namespace(**vars(opt))
    model.train_start()
    with torch.no_grad():
        img, cap, _ = model.forward_emb(torch.from_numpy(inp["images"]), captions, lens.tolist())
        sims = naaf.train_sims(img, cap, lens.tolist(), probe)
    np.testing.assert_allclose(sims.numpy(), ts["sims_train"], atol=1e-5, rtol=0)

    seen = spy_clip(monkeypatch)
    opt.log.clear()
    loss = model.train_emb(torch.from_numpy(inp["images"]), captions, lens.tolist())
    assert abs(float(loss) - float(ts["loss"])) < 1e-4
    assert abs(seen["norm"] - float(ts["grad_norm"])) < 1e-4 * float(ts["grad_norm"])
    names = list(ts["param_names"])
    grads = {n: seen["grads"][id(p)].double().numpy()
             for n, p in named_params(model, PARTS, theirs)}
    assert sorted(grads) == sorted(names)
    total = np.sqrt(sum((ts["grad/" + n].astype(np.float64) ** 2).sum() for n in names))
    for n in names:
        ref = ts["grad/" + n].astype(np.float64)
        err = np.linalg.norm(grads[n] - ref)
        assert err <= 1e-4 * np.linalg.norm(ref) + 1e-6 * total, (n, err)
    # every assignment to the threshold state, caption by caption, and the state after
    assert [k for k, _ in opt.log] == list(ts["thres_log_names"])
    np.testing.assert_allclose([v for _, v in opt.log], ts["thres_log_values"], atol=1e-7)
    np.testing.assert_allclose([getattr(opt, k) for k in keys], ts["thres_after"], atol=1e-7)
    # the Adam step lands where the original's did
    after = load_checkpoint(str(d / "after_step.pth.tar"))
    for ours, ref in zip(model.state_dict(), after["model"], strict=True):
        for k in ref:
            np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose([getattr(opt, k) for k in keys],
                               [getattr(after["opt"], k) for k in keys], atol=1e-7)


# ----------------------------------------------------------------------------- 4. learner

def learning_batch(fixtures):
    tl = np.load(fixture_dir(fixtures, "naaf_ref", FIXTURES[0]) / "thres_learning.npz")
    return (tl, torch.from_numpy(tl["img_emb"]), torch.from_numpy(tl["cap_emb"]),
            tl["cap_lens"].tolist())


def test_threshold_learner(fixtures):
    tl, img, cap, lens = learning_batch(fixtures)
    keys = list(tl["state_keys"])
    opt = LoggedOpt(alpha=2.0, lambda_softmax=20.0, **dict(zip(keys, tl["init_state"])))
    opt.log.clear()
    sims = naaf.train_sims(img, cap, lens, opt)
    np.testing.assert_allclose(sims.numpy(), tl["sims_train"], atol=1e-5, rtol=0)
    assert [k for k, _ in opt.log] == list(tl["log_names"])
    np.testing.assert_allclose([v for _, v in opt.log], tl["log_values"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([getattr(opt, k) for k in keys], tl["final_state"],
                               rtol=1e-5, atol=1e-7)
    # the test score with the learned thres_safe
    test = naaf.naaf_sims(img, cap, lens, opt.thres_safe, 20.0, intra=True)
    np.testing.assert_allclose(test.numpy(), tl["sims_test"], atol=1e-5, rtol=0)

    # the state persists across batches: the next batch's caption 0 uses the learned thres,
    # then (fewer than 200 matched words) the resets
    thres = opt.thres
    again = naaf.train_sims(img[:3], cap[:3], lens[:3], opt)
    first = naaf.naaf_sims(img[:3], cap[:1], lens[:1], thres, 20.0, intra=False)
    np.testing.assert_allclose(again[:, :1].numpy(), first.numpy(), atol=1e-6)
    assert opt.thres == 0 and opt.thres_safe == 0
    assert opt.mean_pos == pytest.approx(tl["final_state"][keys.index("mean_pos")])


def test_learner_rules():
    """The rules the fixture batch does not reach: exactly 200 words leaves the state alone;
    an estimate above 1 is reset to 0 (not clipped), then the EMA."""
    opt = argparse.Namespace(alpha=2.0, thres=0.4, thres_safe=0.2, mean_pos=0.0, stnd_pos=0.0,
                             mean_neg=0.0, stnd_neg=0.0)
    learner = naaf.ThresholdLearner(opt)
    sim = torch.tensor([0.9, 0.1, 0.5])                       # caption 0 ranks image 0 first
    rows = torch.rand(3, 100)
    learner.observe(0, sim, rows)                             # 100 words: reset
    assert (opt.thres, opt.thres_safe) == (0, 0)
    opt.thres, opt.thres_safe = 0.4, 0.2
    learner.observe(0, sim, rows)                             # exactly 200: untouched
    assert (opt.thres, opt.thres_safe) == (0.4, 0.2)
    learner.observe(0, torch.tensor([0.1, 0.9, 0.5]), rows)   # image 1 first: not counted
    assert (opt.thres, opt.thres_safe) == (0.4, 0.2)

    # matched around 1.5 (thres_safe = mu_p - 3 s_p > 1), mismatched around 0.2
    g = torch.Generator().manual_seed(0)
    learner.start_batch()
    learner.max_pos = [1.5 + 0.01 * torch.randn(300, generator=g)]
    learner.max_neg = [0.2 + 0.05 * torch.randn(300, generator=g)]
    learner.n_pos_word = 300
    learner._estimate()
    assert opt.mean_pos == pytest.approx(1.5, abs=0.01)
    assert opt.thres_safe == pytest.approx(0.3 * 0.2)         # 1.47 -> 0, then the EMA
    # the lowest-scoring image gives the "negative"
    learner.start_batch()
    rows = torch.arange(3 * 201, dtype=torch.float32).view(3, 201)
    learner.observe(1, torch.tensor([0.5, 0.9, 0.1]), rows)
    assert torch.equal(learner.max_pos[0], rows[1]) and torch.equal(learner.max_neg[0], rows[2])


# ----------------------------------------------------------------------------- 5. vectorised

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorised_equals_percaption(dtype):
    g = torch.Generator().manual_seed(0)
    B, R, d, lens = 5, 36, 24, [7, 1, 12, 3, 12, 5, 9]
    img = torch.randn(B, R, d, generator=g).abs() + 0.1 * torch.randn(B, R, d, generator=g)
    img = naaf.l2norm(img)
    cap = naaf.l2norm(torch.randn(len(lens), max(lens), d, generator=g))  # padding is garbage
    img, cap = img.to(dtype), cap.to(dtype)
    for intra in (True, False):
        for thres in (0.0, 0.1, 0.3):
            ref = naaf.naaf_sims_percaption(img, cap, lens, thres, 20.0, intra=intra)
            fast = naaf.naaf_sims(img, cap, lens, thres, 20.0, intra=intra)
            assert fast.dtype == torch.float64
            np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-5, rtol=0)
    # a single image, and the wrapper's blocks (tiny budget: many caption and image blocks)
    ref = naaf.naaf_sims_percaption(img[:1], cap, lens, 0.1, 20.0)
    np.testing.assert_allclose(naaf.naaf_sims(img[:1], cap, lens, 0.1, 20.0).numpy(),
                               ref.numpy(), atol=1e-5, rtol=0)
    opt = argparse.Namespace(vocab_size=10, word_dim=4, embed_size=d, img_dim=8,
                             thres_safe=0.1, device="cpu")
    model = NAAF(opt)
    model.sim_budget = 1
    model.val_start()
    ref = naaf.naaf_sims_percaption(img, cap, lens, 0.1, 20.0)
    np.testing.assert_allclose(model.forward_sim(img, cap, lens).numpy(), ref.numpy(),
                               atol=1e-5, rtol=0)


def test_training_grads_match_percaption():
    """The training score's gradient (contexts through the Gram matrix) equals the explicit
    per-caption computation's at a fixed threshold."""
    g = torch.Generator().manual_seed(1)
    lens = [6, 4, 4, 2]
    img = naaf.l2norm(torch.randn(4, 36, 16, generator=g).abs()).double().requires_grad_()
    cap = naaf.l2norm(torch.randn(4, 6, 16, generator=g)).double().requires_grad_()
    w = torch.randn(4, 4, generator=g).double()
    opt = argparse.Namespace(alpha=2.0, lambda_softmax=20.0, thres=0.05, thres_safe=0.0,
                             mean_pos=0.0, stnd_pos=0.0, mean_neg=0.0, stnd_neg=0.0)
    learner = naaf.ThresholdLearner(opt)
    learner.observe = lambda *a: None                         # keep the threshold fixed
    ga = torch.autograd.grad((naaf.train_sims(img, cap, lens, opt, learner) * w).sum(),
                             [img, cap])
    ref = naaf.naaf_sims_percaption(img, cap, lens, 0.05, 20.0, intra=False)
    gb = torch.autograd.grad((ref * w).sum(), [img, cap])
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-9)


# ----------------------------------------------------------------------------- options, vocab

def test_options_and_vocab(original_vocab, tmp_path):
    p = naaf.add_naaf_options(argparse.ArgumentParser())
    opt = p.parse_args([])
    assert (opt.lambda_softmax, opt.alpha, opt.thres, opt.thres_safe) == (20.0, 2.0, 0.0, 0.0)
    assert opt.precomp_enc_text_type == "basic" and not opt.freeze_glove
    assert opt.glove_path is None

    glove = naaf.load_naaf_vocab(str(original_vocab / "naaf" / "f30k_precomp.json"))
    assert len(glove) == 8347
    assert [glove(w) for w in ("<pad>", "<unk>", "<start>", "<end>")] == [0, 1, 2, 3]
    assert glove("no-such-word") == 1
    scan = naaf.load_naaf_vocab(str(original_vocab / "f30k_precomp_vocab.json"))
    assert len(scan) == 8481 and scan("<start>") == 1
    o = argparse.Namespace(data_name="f30k_precomp", precomp_enc_text_type="GloVe")
    assert naaf.naaf_vocab_file(o, str(original_vocab)).endswith("naaf/f30k_precomp.json")
    o.precomp_enc_text_type = "basic"
    assert naaf.naaf_vocab_file(o, "vocab").endswith("f30k_precomp_vocab.json")

    # a GloVe table from --glove_path; --freeze_glove takes it out of the optimiser
    table = torch.randn(12, 4)
    torch.save(table, tmp_path / "glove.pkl")
    opt = argparse.Namespace(vocab_size=12, word_dim=4, embed_size=8, img_dim=6, device="cpu",
                             precomp_enc_text_type="GloVe", glove_path=str(tmp_path / "glove.pkl"))
    model = NAAF(opt)
    assert torch.equal(model.txt_enc.embed.glove.weight.detach(), table)
    assert model.txt_enc.embed.glove.weight.requires_grad  # the original fine-tunes it
    n_trainable = len(model.params)
    opt.freeze_glove = True
    frozen = NAAF(opt)
    assert len(frozen.params) == n_trainable - 1
    assert not frozen.txt_enc.embed.glove.weight.requires_grad
