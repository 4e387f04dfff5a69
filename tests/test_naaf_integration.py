"""NAAF plugged into the SGRAF codebase: the model factory, evaluation.py on original-format
NAAF checkpoints (no NAAF flag), NAAF and SGR+NAAF ensembles, train.py's NAAF rules (refused
flags, torchrun, --resume restoring the threshold), the checkpoint checks, and the demo's
learning at a reduced size."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import data
import demo
import errors
import evaluation
import matchers
import naaf
import opts
import runs
import train
from checkpoint import load_checkpoint
from helpers import run_eval, tiny_dataset, tiny_dims, train_args
from matchers import build_model
from model import SGRAF
from vocab import Vocabulary, deserialize_vocab, serialize_vocab

FIXTURES = ["naaf_small_seed1", "naaf_glove_small_seed1"]


def original_naaf_opt(vocab_size, data_name="synth_precomp", text_type="basic"):
    """An argparse.Namespace with exactly the fields of a checkpoint of the original NAAF
    train.py (its authors' paths; no module_name; the learned threshold state)."""
    return argparse.Namespace(
        data_path="/home/zhangkun/data/", data_name=data_name,
        vocab_path="/home/zhangkun/data/vocab/", margin=0.2, num_epochs=20, batch_size=128,
        word_dim=8, embed_size=16, grad_clip=2.0, num_layers=1, learning_rate=0.0005,
        lr_update=10, workers=10, log_step=200, val_step=10, logger_name="./runs/runX/log",
        logg_path="./runs/runX/logs", model_name="./runs/runX/checkpoint", resume="",
        precomp_enc_type="basic", precomp_enc_text_type=text_type, img_dim=32, no_imgnorm=False,
        no_txtnorm=False, lambda_softmax=20.0, mean_neg=0.33, stnd_neg=0.07, mean_pos=0.59,
        stnd_pos=0.1, thres=0.47, thres_safe=0.3, alpha=2.0, using_intra_info=True,
        vocab_size=vocab_size)


def original_sgr_opt(vocab_size):
    return argparse.Namespace(
        data_path="/apdcephfs/x", data_name="synth_precomp", vocab_path="/apdcephfs/x/vocab/",
        model_name="/apdcephfs/x/runs/checkpoint", logger_name="/apdcephfs/x/runs/log",
        batch_size=128, num_epochs=40, lr_update=30, learning_rate=0.0002, workers=10,
        log_step=10, val_step=1000, grad_clip=2.0, margin=0.2, max_violation=True, img_dim=32,
        word_dim=8, embed_size=16, sim_dim=8, num_layers=1, bi_gru=True, no_imgnorm=False,
        no_txtnorm=False, module_name="SGR", sgr_step=3, vocab_size=vocab_size)


def rsum_line(stdout):
    return next(float(l.split()[1]) for l in stdout.splitlines() if l.startswith("rsum: "))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("naafcli")
    data_path, vocab_path = tiny_dataset(str(root), n_train=5, n_dev=4, n_test=8)
    n_vocab = len(deserialize_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    paths = {}
    for seed, name in enumerate(["NAAF", "NAAF2"]):
        torch.manual_seed(seed)
        opt = original_naaf_opt(n_vocab)
        opt.thres_safe = 0.3 + 0.1 * seed
        model = naaf.NAAF(argparse.Namespace(**vars(opt), device="cpu"))
        paths[name] = str(root / ("%s.pth.tar" % name))
        torch.save({"epoch": 12, "model": model.state_dict(), "best_rsum": 100.0, "opt": opt,
                    "Eiters": 99}, paths[name])
    torch.manual_seed(5)
    opt = original_sgr_opt(n_vocab)
    paths["SGR"] = str(root / "SGR.pth.tar")
    torch.save({"epoch": 7, "model": SGRAF(argparse.Namespace(**vars(opt), device="cpu"))
                .state_dict(), "best_rsum": 1.0, "opt": opt, "Eiters": 9}, paths["SGR"])
    return data_path, vocab_path, paths


def test_build_model():
    opt = opts.parse_opt(["--module_name", "NAAF", "--device", "cpu"] + tiny_dims("NAAF"))
    opt.vocab_size = 20
    assert isinstance(build_model(opt), naaf.NAAF)
    opt.module_name = "SAF"
    opt.sim_dim, opt.sgr_step = 8, 3
    assert isinstance(build_model(opt), SGRAF)
    assert opts.parse_opt(["--num_epoches", "7"]).num_epochs == 7  # NAAF's README spelling


def test_cli_naaf_checkpoint_and_ensembles(setup, tmp_path):
    """No NAAF flag: the checkpoint is recognised; its thres_safe is the one used; the
    ensembles (NAAF+NAAF, SGR+NAAF) are the mean of the single models' matrices."""
    data_path, vocab_path, paths = setup
    common = ["--data_path", data_path, "--vocab_path", vocab_path, "--split", "test"]
    sims = {}
    for name in ["NAAF", "NAAF2", "SGR"]:
        f = str(tmp_path / ("%s.npy" % name))
        run_eval("--model_path", paths[name], "--save_sims", f, *common)
        sims[name] = np.load(f)
        assert sims[name].shape == (8, 40) and sims[name].dtype == np.float64
    # the same scores as the model at the checkpoint's thres_safe
    model, opt, _, _ = evaluation.load_model(paths["NAAF"], data_path, vocab_path, "cpu")
    assert opt.module_name == "NAAF" and opt.thres_safe == 0.3
    loader = evaluation.get_test_loader("test", "synth_precomp",
                                        deserialize_vocab(os.path.join(
                                            vocab_path, "synth_precomp_vocab.json")),
                                        8, 0, opt, matcher=type(model))
    enc = evaluation.encode_data(model, loader, img_stride=loader.dataset.im_div)
    direct = model.score(*enc)
    np.testing.assert_allclose(direct, sims["NAAF"], rtol=0, atol=1e-6)
    assert not np.allclose(sims["NAAF"], sims["NAAF2"])
    for a, b in [("NAAF", "NAAF2"), ("SGR", "NAAF")]:
        f = str(tmp_path / ("%s_%s.npy" % (a, b)))
        out = run_eval("--model_path", paths[a], "--model_path2", paths[b], "--save_sims", f,
                       *common).stdout
        np.testing.assert_allclose(np.load(f), (sims[a] + sims[b]) / 2, rtol=0, atol=1e-12)
        r = evaluation.report((sims[a] + sims[b]) / 2)
        assert rsum_line(out) == pytest.approx(round(r["rsum"], 1))


def _vocab_of(words):
    v = Vocabulary()
    for w in ["<pad>", "<start>", "<end>", "<unk>"] + words:
        v.add_word(w)
    return v


@pytest.mark.parametrize("name", FIXTURES)
def test_cli_authors_checkpoint(fixtures, tmp_path, name):
    """The original code's checkpoints (vocab 50, img_dim 64, data_name f30k_precomp) on a
    generated dataset of that name: the SCAN vocab for basic, the GloVe json for GloVe."""
    data_path, vocab_path = str(tmp_path / "data"), str(tmp_path / "vocab")
    from synthetic import make_synthetic
    make_synthetic(data_path, "f30k_precomp", str(tmp_path / "synth_vocab"), n_train=2,
                   n_dev=2, n_test=6, img_dim=64)
    words = [w for w in deserialize_vocab(str(tmp_path / "synth_vocab" /
                                              "f30k_precomp_vocab.json")).word2idx
             if not w.startswith("<")][:46]
    words += ["zzword%d" % i for i in range(46 - len(words))]  # the checkpoints' 50 words
    scan = _vocab_of(words)
    assert len(scan) == 50
    os.makedirs(os.path.join(vocab_path, "naaf"))
    serialize_vocab(scan, os.path.join(vocab_path, "f30k_precomp_vocab.json"))
    glove = ["<pad>", "<unk>", "<start>", "<end>"] + words
    with open(os.path.join(vocab_path, "naaf", "f30k_precomp.json"), "w") as f:
        json.dump({"word2idx": {w: i for i, w in enumerate(glove)}, "char_level": False,
                   "max_len": 30}, f)
    ckpt = str(tmp_path / "model_best.pth.tar")
    shutil.copy(fixtures / "naaf_ref" / name / "model_best.pth.tar", ckpt)
    out = run_eval("--model_path", ckpt, "--data_path", data_path, "--vocab_path", vocab_path,
                   "--split", "test").stdout
    assert "Images: 6, Captions: 30" in out
    rsum_line(out)


def test_checkpoint_structure_and_mismatch(setup, tmp_path, capsys):
    data_path, vocab_path, paths = setup
    assert len(load_checkpoint(paths["NAAF"])["model"]) == 2  # accepted
    bad = str(tmp_path / "bad.pth.tar")
    torch.save({"model": [{}], "opt": argparse.Namespace()}, bad)
    with pytest.raises(errors.CheckpointError, match="its 1 state dicts fit none of SGR, SAF"):
        matchers.recognise(load_checkpoint(bad), bad)
    run = str(tmp_path / "run")
    # a NAAF checkpoint resumed with SGR's flags, and the other way round
    for ckpt, flags, want in [(paths["NAAF"], [], "--module_name NAAF in the checkpoint, "
                                                 "--module_name SGR from the flags"),
                              (paths["SGR"], ["--module_name", "NAAF"],
                               "--module_name SGR in the checkpoint, --module_name NAAF")]:
        with pytest.raises(SystemExit) as e:
            train.main(train_args(data_path, vocab_path, run, "--resume", ckpt, *flags))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "ckpt_mismatch" not in err and want in err, err
        assert err.count("\n") == 1


@pytest.mark.parametrize("flags,fragment", [
    (["--no-max_violation"], "--no-max_violation: does not apply to NAAF"),
    (["--sum_violation_warmup", "2"], "--sum_violation_warmup 2: does not apply to NAAF"),
    (["--daa_weight", "1"], "--daa_weight 1.0: does not apply to NAAF: it is an option of SGR"),
])
def test_refused_flags(setup, tmp_path, capsys, flags, fragment):
    data_path, vocab_path, _ = setup
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, str(tmp_path / "run"), "--module_name",
                              "NAAF", *flags))
    assert e.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refused_under_torchrun(setup, tmp_path, capsys, monkeypatch):
    data_path, vocab_path, _ = setup
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, str(tmp_path / "run"), "--module_name",
                              "NAAF"))
    assert e.value.code == 2
    assert "--module_name NAAF: NAAF cannot train under torchrun: it learns its threshold" in \
        capsys.readouterr().err


def test_train_saves_original_format_and_resume_restores_threshold(setup, tmp_path,
                                                                   monkeypatch):
    data_path, vocab_path, _ = setup
    run = str(tmp_path / "run")
    args = train_args(data_path, vocab_path, run, "--module_name", "NAAF", "--seed", "0",
                      "--num_epochs", "1")
    train.main(args)
    path = os.path.join(run, "checkpoint", "checkpoint_0.pth.tar")
    ckpt = load_checkpoint(path)
    assert naaf.NAAF.recognise(ckpt) == "NAAF" and ckpt["opt"].module_name == "NAAF"
    assert [k for k in ckpt["model"][1] if k.startswith("rnn.")]  # the original's names
    # evaluation recognises it
    evaluation.evalrank(path, data_path=data_path, split="test", vocab_path=vocab_path,
                        device="cpu")
    # a learned state in the checkpoint's opt comes back on --resume
    state = dict(thres=0.41, thres_safe=0.25, mean_pos=0.6, stnd_pos=0.1, mean_neg=0.3,
                 stnd_neg=0.05)
    for k, v in state.items():
        setattr(ckpt["opt"], k, v)
    torch.save(ckpt, path)
    seen = {}

    def fake_epoch(opt, train_loader, model, epoch, val_loader, writer=None):
        seen.update({k: getattr(model.opt, k) for k in naaf.THRESHOLD_STATE})
    monkeypatch.setattr(train, "train_epoch", fake_epoch)
    train.main(args[:-1] + ["2", "--resume", path])
    assert seen == state


def test_demo_learns(tmp_path):
    """demo.py --module_name NAAF at a reduced size (300 training images, 3 epochs):
    the trained model's rsum on the test split is at least 3x the untrained one's (the full
    demo: 572.1 vs 17.8)."""
    after, before = demo.main(["--module_name", "NAAF", "--data_path", str(tmp_path / "data"),
                               "--vocab_path", str(tmp_path / "vocab"), "--run_dir",
                               str(tmp_path / "run"), "--device", "cpu", "--n_train", "300",
                               "--num_epochs", "3"])
    assert after["rsum"] >= 3 * before["rsum"], (before["rsum"], after["rsum"])


# ----------------------------------------------------------------------------- training rules

def naaf_opt(data_path, vocab_path, *extra):
    opt = opts.parse_opt(train_args(data_path, vocab_path, "unused", "--module_name", "NAAF",
                                    *extra))
    opt.vocab_size = len(deserialize_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    return opt


def test_nonfinite_loss_stops_the_step(setup):
    """NAAF's loss is seen by the guard before the optimizer step, as SGRAF's: an infinite loss
    with finite (zero) gradients stops the step and leaves the parameters as they were."""
    data_path, vocab_path, _ = setup
    model = naaf.NAAF(naaf_opt(data_path, vocab_path))
    runs.stop_on_nonfinite(model)
    model.criterion = lambda sims: sims.sum() * 0 + float("inf")
    before = [p.detach().clone() for p in model.params]
    images = torch.randn(3, 36, 32)
    captions, lens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 2, 0]]), [4, 3, 3]
    with pytest.raises(errors.DivergedError) as e:
        model.train_emb(images, captions, lens)
    assert e.value.key == "diverged_start" and "loss is inf at iteration 1" in str(e.value)
    assert all(torch.isfinite(p.grad).all() for p in model.params if p.grad is not None)
    assert all(torch.equal(a, p) for a, p in zip(before, model.params))


def test_nan_features_stop_the_run(tmp_path, capsys):
    """A NaN image outside the start-up sample: the NAAF run stops on the NaN loss at the first
    batch that holds it, before the step, and saves nothing."""
    n_train = 20
    data_path, vocab_path = tiny_dataset(str(tmp_path), n_train=n_train, n_dev=4, n_test=4)
    path = os.path.join(data_path, "synth_precomp", "train_ims.npy")
    feats = np.load(path)
    bad = min(set(range(n_train)) - set(data.sample_indices(n_train)))
    feats[bad, 3] = np.nan
    np.save(path, feats)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, run, "--module_name", "NAAF",
                              "--num_epochs", "1", "--seed", "1"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    # the run names the image that made the loss NaN
    assert "train_ims.npy: image %d has NaN or Inf features, so at iteration " % bad in err \
        and "loss is nan; nothing was saved" in err, err
    assert not os.path.exists(os.path.join(run, "checkpoint", "checkpoint_0.pth.tar"))


def test_last_batch_of_one(setup, tmp_path, monkeypatch, capsys):
    """25 captions in batches of 12 leave a last batch of 1: refused for SGR (its BatchNorm
    cannot train on it), trained for NAAF (no BatchNorm; a lone pair's hinge loss is 0)."""
    data_path, vocab_path, _ = setup
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, str(tmp_path / "sgr"), "--batch_size",
                              "12"))
    assert e.value.code == 2 and "leave a last batch of 1" in capsys.readouterr().err
    sizes, step = [], naaf.NAAF.train_emb

    def spy(self, images, *args, **kwargs):
        sizes.append(len(images))
        return step(self, images, *args, **kwargs)
    monkeypatch.setattr(naaf.NAAF, "train_emb", spy)
    train.main(train_args(data_path, vocab_path, str(tmp_path / "naaf"), "--module_name",
                          "NAAF", "--batch_size", "12", "--num_epochs", "1"))
    assert sizes == [12, 12, 1]
    assert os.path.exists(tmp_path / "naaf" / "checkpoint" / "checkpoint_0.pth.tar")


def test_two_state_dicts_that_are_not_naaf(setup):
    """Only NAAF's keys (and threshold state) make a two-state-dict checkpoint NAAF's: a SGRAF
    checkpoint that lost its sim_enc, or SCAN's (NAAF's keys, no thres_safe in its opt), is
    described by its state dicts, not called NAAF."""
    data_path, vocab_path, paths = setup
    sgr, nf = load_checkpoint(paths["SGR"]), load_checkpoint(paths["NAAF"])
    assert naaf.NAAF.infer_flags(nf["model"], nf["opt"])["module_name"] == "NAAF"
    assert naaf.NAAF.infer_flags(nf["model"])["module_name"] == "NAAF"
    scan_opt = argparse.Namespace(**{k: v for k, v in vars(nf["opt"]).items()
                                     if k not in naaf.THRESHOLD_STATE})
    cut = {"model": sgr["model"][:2], "opt": sgr["opt"]}
    scan = {"model": nf["model"], "opt": scan_opt}
    for ckpt in (cut, scan):
        assert naaf.NAAF.infer_flags(ckpt["model"], ckpt["opt"])["module_name"] is None
        assert SGRAF.infer_flags(ckpt["model"], ckpt["opt"])["module_name"] is None
    assert naaf.NAAF.infer_flags(cut["model"])["precomp_enc_text_type"] is None
    model = SGRAF(naaf_opt(data_path, vocab_path, "--module_name", "SGR"))
    for ckpt in (cut, scan):
        with pytest.raises(errors.CheckpointError) as e:
            matchers.check_fits(model, ckpt, "x.pth")
        msg = str(e.value)
        assert e.value.key == "ckpt_foreign" and "NAAF" not in msg, msg
        assert "x.pth: its weights do not fit the SGR model the flags build: 2 state dicts " \
               "in the checkpoint, 3 (img_enc, txt_enc, sim_enc) from the flags" in msg, msg
    # the truncated SGRAF checkpoint's own two state dicts fit: only the count differs
    assert "missing keys" not in str(pytest.raises(
        errors.CheckpointError, checkpoint.check_checkpoint_matches, model, cut, "x.pth").value)
    # NAAF's own checkpoint is named by its class
    with pytest.raises(errors.CheckpointError) as e:
        matchers.check_fits(model, nf, "x.pth")
    assert e.value.key == "ckpt_mismatch"
    assert "--module_name NAAF in the checkpoint, --module_name SGR from the flags; 2 state " \
           "dicts in the checkpoint, 3 (img_enc, txt_enc, sim_enc) from the flags" \
           in str(e.value)


def test_foreign_checkpoint_names_the_model_the_flags_build(setup):
    """A checkpoint whose keys no flag explains is said not to fit the model the flags build:
    NAAF's, not 'the SGRAF model'."""
    data_path, vocab_path, paths = setup
    nf = load_checkpoint(paths["NAAF"])
    nf["model"][0]["fc2.weight"] = nf["model"][0].pop("fc.weight")
    model = naaf.NAAF(naaf_opt(data_path, vocab_path))
    with pytest.raises(errors.CheckpointError) as e:
        checkpoint.check_checkpoint_matches(model, nf, "x.pth")
    assert e.value.key == "ckpt_foreign"
    assert "x.pth: its weights do not fit the NAAF model the flags build: missing keys " \
           "img_enc.fc.weight; unexpected keys img_enc.fc2.weight" in str(e.value), str(e.value)
