"""Training: resumable to the bit, crash-safe checkpoints, TensorBoard scalars."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import outputs
import train
from checkpoint import load_checkpoint, save_checkpoint
from helpers import tiny_dataset, train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(str(tmp_path_factory.mktemp("synth")), n_train=20, n_dev=6)


def state_of(path):
    return load_checkpoint(path)["model"]


def assert_same_state(a, b):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_resume_after_kill_is_identical(dataset, tmp_path):
    data_path, vocab_path = dataset
    common = ["--num_epochs", "2", "--seed", "3"]
    # uninterrupted: 2 epochs in-process
    straight = str(tmp_path / "straight")
    train.main(train_args(data_path, vocab_path, straight, *common))

    # the same command in a subprocess, killed once epoch 0's checkpoint exists
    killed = str(tmp_path / "killed")
    args = train_args(data_path, vocab_path, killed, *common, "--val_step", "100000")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py")] + args,
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck0 = os.path.join(killed, "checkpoint", "checkpoint_0.pth.tar")
    deadline = time.time() + 120
    while not os.path.exists(ck0) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(ck0)
    # resume from the checkpoint of epoch 0 and run the second epoch
    train.main(train_args(data_path, vocab_path, killed, *common, "--resume", ck0))
    assert_same_state(state_of(os.path.join(straight, "checkpoint", "checkpoint_1.pth.tar")),
                      state_of(os.path.join(killed, "checkpoint", "checkpoint_1.pth.tar")))
    ck = load_checkpoint(os.path.join(killed, "checkpoint", "checkpoint_1.pth.tar"))
    assert ck["epoch"] == 2 and ck["Eiters"] == 20 and "optimizer" in ck
    # TensorBoard event files with the original scalar names
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(straight, "log"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"epoch", "step", "batch_time", "data_time", "Eit", "lr", "Loss", "r1", "r5", "r10",
            "medr", "meanr", "r1i", "r5i", "r10i", "medri", "r_sum"} <= tags


def test_killed_save_keeps_previous_best(tmp_path, monkeypatch):
    prefix = str(tmp_path) + "/"
    good = {"epoch": 1, "model": [{"w": torch.ones(3)}], "best_rsum": 1.0, "opt": None,
            "Eiters": 1}
    save_checkpoint(good, True, "checkpoint_0.pth.tar", prefix)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    bad = dict(good, epoch=2, model=[{"w": torch.zeros(3)}])
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(bad, True, "checkpoint_1.pth.tar", prefix)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    best = torch.load(prefix + "model_best.pth.tar", weights_only=True)
    assert best["epoch"] == 1 and torch.equal(best["model"][0]["w"], torch.ones(3))
    assert not os.path.exists(prefix + "checkpoint_1.pth.tar")
    assert sorted(os.listdir(tmp_path)) == [outputs.MARKER, "checkpoint_0.pth.tar",
                                            "model_best.pth.tar"]
