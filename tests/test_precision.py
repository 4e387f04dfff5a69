"""train.py --precision bf16 on the CPU: every matcher of the registry trains under bf16
autocast (its layers really run in bf16) with a finite fp32 loss, fp32 weights and fp32 Adam
state; the checkpoint records the precision and `--resume` keeps it unless --precision is
given; fp32 (the default) has no autocast at all."""
import math
import os
from contextlib import nullcontext

import pytest
import torch

import matchers
import train
from checkpoint import load_checkpoint
from helpers import REPO, tiny_dataset, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(str(tmp_path_factory.mktemp("synth")), n_train=20, n_dev=6, n_test=6)


def flags(name, *extra):
    """A tiny run of matcher `name`: its demo flags (HREM's small BERT), a batch of 10."""
    return (["--module_name", name] + matchers.MATCHERS[name].demo_flags +
            ["--batch_size", "10", "--num_epochs", "1", "--seed", "0", "--val_step", "1000"] +
            list(extra))


@pytest.mark.parametrize("name", list(matchers.MATCHERS))
def test_bf16_training_step(dataset, tmp_path, monkeypatch, name):
    data_path, vocab_path = dataset
    cls = matchers.MATCHERS[name]
    seen = {"linear": set(), "loss": []}
    step = cls.train_emb

    def spy(self, *a, **k):
        hooks = [m.register_forward_hook(lambda mod, i, out: seen["linear"].add(out.dtype))
                 for part in self.modules() for m in part.modules()
                 if isinstance(m, torch.nn.Linear)]
        loss = step(self, *a, **k)
        for h in hooks:
            h.remove()
        seen["loss"].append(loss)
        seen["model"] = self
        return loss
    monkeypatch.setattr(cls, "train_emb", spy)
    run = str(tmp_path / "run")
    train.main(train_args(data_path, vocab_path, run, *flags(name, "--precision", "bf16")))
    assert torch.bfloat16 in seen["linear"]  # autocast was on in the train step
    assert seen["loss"] and all(x.dtype == torch.float32 and math.isfinite(float(x))
                                for x in seen["loss"])
    model = seen["model"]
    assert all(p.dtype == torch.float32 for p in model.params)
    for state in model.optimizer.state_dict()["state"].values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    ck = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint_0.pth.tar"))
    assert ck["opt"].precision == "bf16"
    assert all(v.dtype == torch.float32 for sd in ck["model"] for v in sd.values()
               if v.is_floating_point())


def test_fp32_is_the_default_without_autocast(dataset, tmp_path, monkeypatch):
    data_path, vocab_path = dataset
    seen = []
    cls = matchers.MATCHERS["SGR"]
    step = cls.train_emb

    def spy(self, *a, **k):
        seen.append(self.autocast)
        return step(self, *a, **k)
    monkeypatch.setattr(cls, "train_emb", spy)
    run = str(tmp_path / "run")
    train.main(train_args(data_path, vocab_path, run, *flags("SGR")))
    assert seen and all(isinstance(c, nullcontext) for c in seen)
    ck = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint_0.pth.tar"))
    assert ck["opt"].precision == "fp32"


def test_resume_keeps_the_precision_unless_given(dataset, tmp_path):
    data_path, vocab_path = dataset
    run = str(tmp_path / "run")
    train.main(train_args(data_path, vocab_path, run, *flags("SAF", "--precision", "bf16")))
    ck0 = os.path.join(run, "checkpoint", "checkpoint_0.pth.tar")
    ck1 = os.path.join(run, "checkpoint", "checkpoint_1.pth.tar")
    train.main(train_args(data_path, vocab_path, run,
                          *flags("SAF", "--num_epochs", "2", "--resume", ck0)))
    assert load_checkpoint(ck1)["opt"].precision == "bf16"
    other = str(tmp_path / "other")
    train.main(train_args(data_path, vocab_path, other,
                          *flags("SAF", "--num_epochs", "2", "--resume", ck0,
                                 "--precision", "fp32")))
    assert load_checkpoint(os.path.join(other, "checkpoint",
                                        "checkpoint_1.pth.tar"))["opt"].precision == "fp32"


def test_fp32_parts_are_documented():
    """docs/training.md names every part a matcher keeps in fp32 under bf16."""
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        doc = f.read()
    for cls in matchers.classes():
        for part in cls.fp32_parts:
            assert part in doc, (cls.__name__, part)
