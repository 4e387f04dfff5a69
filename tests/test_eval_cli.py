"""evaluation.py end to end: a generated SCAN-format dataset and checkpoints in the original
format (authors' absolute paths in `opt`), single models, the ensemble, npy and h5 features."""
import argparse
import os
import re

import numpy as np
import pytest
import torch

import np2h
from helpers import result_lines, run_eval, tiny_dataset
from model import SGRAF


def original_opt(module_name, vocab_size):
    """An argparse.Namespace with exactly the fields of the original opts.py (python3.6)."""
    return argparse.Namespace(
        data_path="/apdcephfs/share_1313228/home/haiwendiao", data_name="synth_precomp",
        vocab_path="/apdcephfs/share_1313228/home/haiwendiao/SGRAF-master/vocab/",
        model_name="/apdcephfs/x/runs/checkpoint", logger_name="/apdcephfs/x/runs/log",
        batch_size=128, num_epochs=40, lr_update=30, learning_rate=0.0002, workers=10,
        log_step=10, val_step=1000, grad_clip=2.0, margin=0.2, max_violation=True, img_dim=32,
        word_dim=8, embed_size=16, sim_dim=8, num_layers=1, bi_gru=True, no_imgnorm=False,
        no_txtnorm=False, module_name=module_name, sgr_step=3, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    data_path, vocab_path = tiny_dataset(str(root), n_train=5, n_dev=4, n_test=8)
    from vocab import deserialize_vocab
    n_vocab = len(deserialize_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    paths = {}
    for i, name in enumerate(["SGR", "SAF"]):
        torch.manual_seed(i)
        opt = original_opt(name, n_vocab)
        model = SGRAF(argparse.Namespace(**vars(opt), device="cpu"))
        path = str(root / ("%s.pth.tar" % name))
        torch.save({"epoch": 7, "model": model.state_dict(), "best_rsum": 123.4, "opt": opt,
                    "Eiters": 99}, path)
        paths[name] = path
    return data_path, vocab_path, paths


LINES = [r"^rsum: \d+\.\d$", r"^Average i2t Recall: \d+\.\d$",
         r"^Image to text: (\d+\.\d ){4}\d+\.\d$", r"^Average t2i Recall: \d+\.\d$",
         r"^Text to image: (\d+\.\d ){4}\d+\.\d$"]


def original_block(stdout):
    """The five lines the original's evalrank prints first, each in its format."""
    block = result_lines(stdout)[:5]
    for pattern, line in zip(LINES, block, strict=True):
        assert re.match(pattern, line), line
    return block


def test_cli_single_and_ensemble(setup, tmp_path):
    data_path, vocab_path, paths = setup
    sims = {}
    for name in ["SGR", "SAF"]:
        f = str(tmp_path / ("%s.npy" % name))
        out = run_eval("--model_path", paths[name], "--data_path", data_path, "--vocab_path",
                       vocab_path, "--split", "test", "--save_sims", f).stdout
        original_block(out)
        sims[name] = np.load(f)
        assert sims[name].shape == (8, 40)
    f = str(tmp_path / "ens.npy")
    out = run_eval("--model_path", paths["SGR"], "--model_path2", paths["SAF"], "--data_path",
                   data_path, "--vocab_path", vocab_path, "--split", "test", "--save_sims",
                   f).stdout
    block = original_block(out)
    np.testing.assert_allclose(np.load(f), (sims["SGR"] + sims["SAF"]) / 2, rtol=0, atol=1e-12)
    # the printed numbers are those of the ensemble's matrix
    from evaluation import i2t, t2i
    r, ri = i2t(None, None, None, np.load(f)), t2i(None, None, None, np.load(f))
    assert block[2] == "Image to text: %.1f %.1f %.1f %.1f %.1f" % r
    assert block[4] == "Text to image: %.1f %.1f %.1f %.1f %.1f" % ri
    # DAA's ASP follows the R@K lines, from the semantics of the split's captions
    import daa
    from data import read_captions
    caps = read_captions(os.path.join(data_path, "synth_precomp", "test_caps.txt"))
    sems = daa.split_semantics(daa.caption_tfidf(caps), 8)
    assert "ASP: i2t %.1f t2i %.1f" % daa.asp_metric(np.load(f), sems) in out.splitlines()


def test_h5_features_give_identical_numbers(setup, tmp_path):
    data_path, vocab_path, paths = setup
    split_dir = os.path.join(data_path, "synth_precomp")
    h5 = os.path.join(split_dir, "test.h5")
    if not os.path.exists(h5):
        assert np2h.main(["--data_path", split_dir, "--splits", "test"]) == 0
    import h5py
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["feat"][:], np.load(os.path.join(split_dir, "test_ims.npy")))
    outs = []
    for fmt in ["npy", "h5"]:
        f = str(tmp_path / ("%s.npy" % fmt))
        run_eval("--model_path", paths["SGR"], "--data_path", data_path, "--vocab_path",
                 vocab_path, "--split", "test", "--feat_format", fmt, "--save_sims", f)
        outs.append(np.load(f))
    assert np.array_equal(outs[0], outs[1])


def test_precision_flag(setup, tmp_path):
    """--precision bf16 scores under bf16 autocast: close to fp32 but not equal (so the flag
    reaches the scoring); the default keeps the checkpoint's fp32."""
    data_path, vocab_path, paths = setup
    res = {}
    for prec in [None, "bf16"]:
        f = str(tmp_path / ("%s.npy" % prec))
        args = ["--model_path", paths["SAF"], "--data_path", data_path, "--vocab_path",
                vocab_path, "--split", "test", "--save_sims", f]
        original_block(run_eval(*args, *([] if prec is None else ["--precision", prec])).stdout)
        res[prec] = np.load(f)
    diff = np.abs(res["bf16"] - res[None]).max()
    assert 0 < diff < 2e-2, diff
