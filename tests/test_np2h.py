"""np2h.py: exact round trip, NaN/Inf refused, nothing overwritten; training reads .npy and .h5
to identical weights."""
import os

import h5py
import numpy as np
import pytest
import torch

import np2h
import train
from checkpoint import load_checkpoint
from helpers import tiny_dataset, train_args


def test_round_trip_exact(tmp_path):
    x = np.random.default_rng(0).random((23, 36, 7), dtype=np.float32)
    np.save(tmp_path / "train_ims.npy", x)
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "train", "--chunk", "5"]) == 0
    with h5py.File(tmp_path / "train.h5", "r") as f:
        assert f["feat"].dtype == np.float32 and np.array_equal(f["feat"][:], x)
    # an existing .h5 is not replaced without --overwrite
    before = (tmp_path / "train.h5").read_bytes()
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "train"]) == 2
    assert (tmp_path / "train.h5").read_bytes() == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_refused(tmp_path, capsys, bad):
    x = np.ones((10, 36, 4), dtype=np.float32)
    x[7, 3, 1] = bad
    np.save(tmp_path / "dev_ims.npy", x)
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "dev", "--chunk", "4"]) == 2
    assert "image 7 holds NaN or Inf" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dev_ims.npy"]  # no partial file left


def test_missing_split_named(tmp_path, capsys):
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "test"]) == 2
    assert "test_ims.npy not found" in capsys.readouterr().err


def test_training_npy_equals_h5(tmp_path):
    data_path, vocab_path = tiny_dataset(str(tmp_path), n_train=10, n_dev=4, n_test=4)
    split_dir = os.path.join(data_path, "synth_precomp")
    assert np2h.main(["--data_path", split_dir, "--splits", "train", "dev"]) == 0
    states = []
    for fmt in ["npy", "h5"]:
        run = str(tmp_path / fmt)
        train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1", "--seed", "0",
                              "--feat_format", fmt))
        states.append(load_checkpoint(os.path.join(run, "checkpoint", "checkpoint_0.pth.tar")))
    assert states[0]["best_rsum"] == states[1]["best_rsum"]
    for a, b in zip(states[0]["model"], states[1]["model"]):
        for k in a:
            assert torch.equal(a[k], b[k]), k
