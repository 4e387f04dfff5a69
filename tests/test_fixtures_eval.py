"""Acceptance of the SGRAF core against the original code's outputs (tests/fixtures)."""
import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from data import collate_fn
from evaluation import encode_data, i2t, shard_attn_scores, t2i
from helpers import fixture_dir, load_fixture
from loss import ContrastiveLoss
from model import SGRAF

FIXTURES = ["small_sgr_seed1", "small_saf_seed1"]


class ArrayDataset(torch.utils.data.Dataset):
    """Item k = (image k // 5, caption k), as PrecompDataset yields it."""

    def __init__(self, images, captions, lengths):
        self.images, self.captions, self.lengths = images, captions, lengths

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, k):
        cap = torch.from_numpy(self.captions[k, :self.lengths[k]])
        return torch.from_numpy(self.images[k // 5]), cap, k, k // 5


def load_sgraf(fixtures, name):
    """A fixture's model, its flags, its inputs and the original's outputs."""
    model, opt, _ = load_fixture(fixtures, "sgraf_ref", name, SGRAF)
    d = fixture_dir(fixtures, "sgraf_ref", name)
    return model, opt, np.load(d / "inputs.npz"), np.load(d / "expected.npz")


@pytest.mark.parametrize("name", FIXTURES)
def test_strict_load_and_names(fixtures, name):
    d = fixture_dir(fixtures, "sgraf_ref", name)
    ckpt = load_checkpoint(str(d / "model_best.pth.tar"))
    model, *_ = load_sgraf(fixtures, name)
    for ours, theirs in zip(model.state_dict(), ckpt["model"], strict=True):
        assert list(ours.keys()) == list(theirs.keys())


@pytest.mark.parametrize("name", FIXTURES)
def test_direct_sims(fixtures, name):
    model, opt, inp, exp = load_sgraf(fixtures, name)
    model.val_start()
    with torch.no_grad():
        img, cap, lens = model.forward_emb(torch.from_numpy(inp["images"]),
                                           torch.from_numpy(inp["captions"]),
                                           inp["lengths"].tolist())
        sims = model.forward_sim(img, cap, lens).numpy()
    np.testing.assert_allclose(sims, exp["sims_direct"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_evalrank_path(fixtures, name):
    model, opt, inp, exp = load_sgraf(fixtures, name)
    ds = ArrayDataset(inp["images"], inp["captions"], inp["lengths"])
    loader = torch.utils.data.DataLoader(ds, batch_size=7, shuffle=False, collate_fn=collate_fn)
    img_embs, cap_embs, cap_lens = encode_data(model, loader)
    assert img_embs.shape[0] == 50
    np.testing.assert_allclose(cap_embs, exp["cap_embs"], atol=1e-6, rtol=0)
    img_embs = img_embs[::5]
    np.testing.assert_allclose(img_embs, exp["img_embs"], atol=1e-6, rtol=0)
    sims = shard_attn_scores(model, img_embs, cap_embs, cap_lens, opt, shard_size=3)
    np.testing.assert_allclose(sims, exp["sims"], atol=1e-5, rtol=0)

    r, (ranks, top1) = i2t(img_embs, cap_embs, cap_lens, sims, return_ranks=True)
    ri, (ranks_i, top1_i) = t2i(img_embs, cap_embs, cap_lens, sims, return_ranks=True)
    assert np.array_equal(np.array(r), exp["i2t"])
    assert np.array_equal(np.array(ri), exp["t2i"])
    assert np.array_equal(ranks, exp["i2t_ranks"]) and np.array_equal(top1, exp["i2t_top1"])
    assert np.array_equal(ranks_i, exp["t2i_ranks"]) and np.array_equal(top1_i, exp["t2i_top1"])
    assert sum(r[:3]) + sum(ri[:3]) == float(exp["rsum"])


@pytest.mark.parametrize("name", FIXTURES)
def test_contrastive_loss(fixtures, name):
    _, opt, _, exp = load_sgraf(fixtures, name)
    square = torch.from_numpy(exp["square_sims"])
    hard = ContrastiveLoss(margin=opt.margin, max_violation=True)(square)
    total = ContrastiveLoss(margin=opt.margin, max_violation=False)(square)
    assert abs(hard.item() - float(exp["loss_max_violation"])) < 1e-5
    assert abs(total.item() - float(exp["loss_sum_violation"])) < 1e-4
