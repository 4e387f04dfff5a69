"""DAA in training: the SGR pair-subset step gives the full-graph gradients of hinge + DAA, and
a training run logs the hinge and the two DAA terms."""
import copy
import os

import numpy as np
import pytest
import torch

import evaluation
import similarity
import train
from daa import DAALoss
from helpers import tiny_dataset, train_args
from loss import ContrastiveLoss
from contract import l2norm
from model import EncoderSimilarity


@pytest.mark.parametrize("dense", [0.0, 1.01])  # whole-matrix recompute; pair by pair
def test_subset_step_equals_full_graph_with_daa(dense, monkeypatch):
    monkeypatch.setattr(similarity, "DENSE_SUPPORT", dense)
    torch.manual_seed(0)
    B, D = 8, 16
    ref_sim = EncoderSimilarity(D, 8, "SGR")
    for m in ref_sim.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    sim = copy.deepcopy(ref_sim)
    g = torch.Generator().manual_seed(1)
    lens = sorted(torch.randint(3, 12, (B,), generator=g).tolist(), reverse=True)
    img = l2norm(torch.randn(B, 36, D, generator=g))
    cap = l2norm(torch.randn(B, max(lens), D, generator=g))
    cap = cap * (torch.arange(max(lens))[None, :, None] < torch.tensor(lens)[:, None, None])
    sems = torch.rand(B, B, generator=g) + torch.eye(B)
    hinge, daa = ContrastiveLoss(0.2, max_violation=True), DAALoss(10.0)

    def loss_fn(s):
        i2t, t2i = daa(s, sems)
        return hinge(s) + i2t + t2i

    img_a, cap_a = img.clone().requires_grad_(), cap.clone().requires_grad_()
    img_b, cap_b = img.clone().requires_grad_(), cap.clone().requires_grad_()
    ref = loss_fn(ref_sim.forward_percaption(img_a, cap_a, lens))
    ref.backward()
    value, surrogate, _ = sim(img_b, cap_b, lens, loss_fn=loss_fn)
    surrogate.backward()
    assert abs(value.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    pairs = [(img_a, img_b), (cap_a, cap_b)] + list(zip(ref_sim.parameters(), sim.parameters()))
    total = torch.sqrt(sum(a.grad.pow(2).sum() for a, _ in pairs))
    for a, b in pairs:
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        assert (gb - a.grad).norm() <= 1e-4 * a.grad.norm() + 1e-6 * total


def test_daa_training_logs_three_terms(tmp_path):
    data_path, vocab_path = tiny_dataset(str(tmp_path), n_train=8, n_dev=4, n_test=4)
    for module in ["SGR", "SAF"]:
        run = str(tmp_path / module)
        train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1", "--seed", "0",
                              "--daa_weight", "10", "--module_name", module))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(os.path.join(run, "log"))
        acc.Reload()
        scalars = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        for tag in ["Loss", "Hinge", "DAA_i2t", "DAA_t2i"]:
            assert tag in scalars and len(scalars[tag]) == 4, tag
        total = np.array(scalars["Hinge"]) + scalars["DAA_i2t"] + scalars["DAA_t2i"]
        np.testing.assert_allclose(scalars["Loss"], total, rtol=1e-5)
        assert all(0 <= v <= 10 for v in scalars["DAA_i2t"] + scalars["DAA_t2i"])
        # validation logs ASP next to R@K: the same numbers as evaluation.py on that model
        assert len(scalars["asp_i2t"]) == len(scalars["asp_t2i"]) == len(scalars["r_sum"]) == 1
        out = evaluation.evalrank(os.path.join(run, "checkpoint", "model_best.pth.tar"),
                                  data_path=data_path, split="dev", vocab_path=vocab_path,
                                  device="cpu")
        np.testing.assert_allclose([scalars["asp_i2t"][0], scalars["asp_t2i"][0]], out["asp"],
                                   rtol=1e-5)
        assert 0 < out["asp"][0] <= 100 and 0 < out["asp"][1] <= 100
