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
from helpers import expect_exit, tiny_dataset, train_args


def test_round_trip_exact(tmp_path, capsys):
    x = np.random.default_rng(0).random((23, 36, 7), dtype=np.float32)
    np.save(tmp_path / "train_ims.npy", x)
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "train", "--chunk", "5"]) == 0
    with h5py.File(tmp_path / "train.h5", "r") as f:
        assert f["feat"].dtype == np.float32 and np.array_equal(f["feat"][:], x)
    # converted from this .npy: up to date, left as it is
    before = (tmp_path / "train.h5").read_bytes()
    capsys.readouterr()
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "train"]) == 0
    assert "train.h5 is up to date" in capsys.readouterr().out
    assert (tmp_path / "train.h5").read_bytes() == before
    # an .h5 np2h.py did not write (or one of another .npy) is not replaced without --overwrite
    np.save(tmp_path / "train_ims.npy", x[:20])
    expect_exit(np2h.main, ["--data_path", str(tmp_path), "--splits", "train"], capsys,
                "file_exists", "train.h5: already exists (converted by np2h.py from another .npy)")
    (tmp_path / "train.h5").write_bytes(b"not mine")
    expect_exit(np2h.main, ["--data_path", str(tmp_path), "--splits", "train"], capsys,
                "file_exists", "train.h5: already exists; pass --overwrite to replace it")
    assert (tmp_path / "train.h5").read_bytes() == b"not mine"
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "train", "--overwrite"]) == 0
    with h5py.File(tmp_path / "train.h5", "r") as f:
        assert np.array_equal(f["feat"][:], x[:20])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_refused(tmp_path, capsys, bad):
    x = np.ones((10, 36, 4), dtype=np.float32)
    x[7, 3, 1] = bad
    np.save(tmp_path / "dev_ims.npy", x)
    expect_exit(np2h.main, ["--data_path", str(tmp_path), "--splits", "dev", "--chunk", "4"],
                capsys, "features_nonfinite",
                "image 7 has NaN or Inf features (found while converting it)")
    assert sorted(os.listdir(tmp_path)) == ["dev_ims.npy"]  # no partial file left


def test_missing_split_named(tmp_path, capsys):
    expect_exit(np2h.main, ["--data_path", str(tmp_path), "--splits", "test"], capsys,
                "features_missing", "test_ims.npy: feature file not found")


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
