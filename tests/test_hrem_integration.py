"""HREM through the matcher contract: train.py (the checkpoint's contents and HREM's defaults,
an exact --resume with the criterion and its warm-up counter), evaluation.py (our checkpoints
and original-format ones recognised without a flag, --bert_path, an ensemble with a
cross-attention matcher), demo.py, and the one-line errors of bad input."""
import argparse
import json
import os
import shlex

import numpy as np
import pytest
import torch

import demo
import evaluation
import hrem
import opts
import serve
import train
from checkpoint import load_checkpoint
from conftest import REPO
from helpers import eval_main, tiny_dataset, train_args
from model import SGRAF
from vocab import deserialize_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

BERT_DEMO = str(REPO / "bert_demo")
HREM_FLAGS = ["--module_name", "HREM", "--bert_path", BERT_DEMO, "--bert_init", "random",
              "--nhead", "4", "--warmup", "3", "--val_split", "dev", "--seed", "3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(str(tmp_path_factory.mktemp("hrem_data")), n_train=20, n_dev=6,
                        n_test=6)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """Two epochs of 10 steps (the graph losses from iteration 3)."""
    data_path, vocab_path = dataset
    run = str(tmp_path_factory.mktemp("hrem_run"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread): the float sums, so the weights, follow
    try:
        train.main(train_args(data_path, vocab_path, run, *HREM_FLAGS, "--num_epochs", "2"))
    finally:
        torch.set_num_threads(n)
    return run


def ckpt_path(run, name="model_best.pth.tar"):
    return os.path.join(run, "checkpoint", name)


def expect_error(capsys, fn, argv, *fragments):
    """fn(argv) exits 2 with one line on stderr that holds every fragment."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err
    return err


def original_opt(**kw):
    """The fields of an original HREM checkpoint's opt (arguments.py + graph_lib), with the
    authors' paths and no field of ours."""
    opt = dict(data_path="/data/darkpromise/", dataset="f30k", margin=0.2, num_epochs=30,
               batch_size=128, embed_size=16, grad_clip=2.0, learning_rate=0.0005, workers=8,
               log_step=200, val_step=500, logger_name="runs/f30k_test",
               model_name="runs/f30k_test", max_violation=True, img_dim=32, no_imgnorm=False,
               no_txtnorm=False, vse_mean_warmup_epochs=1, multi_gpu=0, size_augment=1,
               mask_repeat=1, save_results=1, gpu_id=0,
               bert_path="/model/darkpromise/VSE_backbone/bert-base-uncased",
               lr_schedules=[15, 25], decay_rate=0.1, base_loss="trip", gnn_loss="trip",
               warmup=8000, residual_weight=0.8, num_layers_enc=1, nhead=4, dropout=0.1,
               graph_lr_factor=1.0, mask_weight=1.0, threshold=0.5, topk=10,
               reg_loss_weight=10, norm_input=1, cross_loss=1)
    opt.update(kw)
    return argparse.Namespace(**opt)


# ----------------------------------------------------------------------------- training

def test_checkpoint_and_defaults(trained):
    ckpt = load_checkpoint(ckpt_path(trained, "checkpoint_1.pth.tar"))
    img, txt = ckpt["model"]
    assert "fc.fc.weight" in img and "fc.mlp.bns.1.running_mean" in img
    assert "bert.embeddings.word_embeddings.weight" in txt and "linear.weight" in txt
    assert hrem.HREM.recognise(ckpt) == "HREM"
    # the criterion and its warm-up counter, which the original does not save
    assert "gnn.layers.0.self_attn.in_proj_weight" in ckpt["criterion"]
    assert "adj_model.adj_learning.mlp_t2i.0.weight" in ckpt["criterion"]
    assert ckpt["criterion_iter_count"] == ckpt["Eiters"] == 20
    opt = ckpt["opt"]
    # HREM's own defaults for the shared flags, where none was given
    assert (opt.learning_rate, opt.max_violation, opt.lr_schedules) == (5e-4, False, [15, 25])
    assert opt.val_split == "dev" and opt.bert_init == "random"
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [5e-4, 5e-5, 5e-4, 5e-4]
    assert opts.parse_opt(["--module_name", "HREM"]).num_epochs == 30
    assert opts.parse_opt(["--module_name", "HREM"]).val_step == hrem.VAL_PER_EPOCH


def test_resume_is_exact(dataset, trained, tmp_path):
    """One epoch, then --resume for the second: the same weights, criterion, warm-up counter
    and optimizer state as the two epochs in one go (the augmentations, the dropout and the
    negative draws come from the generators the checkpoint saves)."""
    data_path, vocab_path = dataset
    run = str(tmp_path / "resumed")
    train.main(train_args(data_path, vocab_path, run, *HREM_FLAGS, "--num_epochs", "1"))
    train.main(train_args(data_path, vocab_path, run, *HREM_FLAGS, "--num_epochs", "2",
                          "--resume", ckpt_path(run, "checkpoint_0.pth.tar")))
    a = load_checkpoint(ckpt_path(trained, "checkpoint_1.pth.tar"))
    b = load_checkpoint(ckpt_path(run, "checkpoint_1.pth.tar"))
    for sa, sb in zip(a["model"] + [a["criterion"]], b["model"] + [b["criterion"]]):
        assert list(sa) == list(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a["criterion_iter_count"] == b["criterion_iter_count"] == 20
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_train_batch_drops_last_and_augments(dataset):
    """The training loader drops the last incomplete batch and hands the step the captions'
    words (the augmentations are drawn there); evaluation items hold each image once."""
    data_path, _ = dataset
    opt = opts.parse_opt(["--data_path", data_path, "--data_name", "synth_precomp",
                          "--batch_size", "30", "--workers", "0", "--device", "cpu",
                          "--img_dim", "32"] + HREM_FLAGS[:4])
    import data
    vocab, _ = hrem.HREM.vocabulary(opt)
    train_loader, val_loader = data.get_loaders("synth_precomp", vocab, 30, 0, opt,
                                                matcher=hrem.HREM)
    batches = list(train_loader)
    assert len(batches) == 3 and all(len(b) == 30 for b in batches)  # 100 captions
    b = batches[0]
    assert len(b.words) == 30 and b.img_lengths.tolist() == [36] * 30
    flat = [[vocab.cls_id] + [t for w in words for t in w] + [vocab.sep_id]
            for words in b.words]
    assert [b.captions[i, :n].tolist() for i, n in enumerate(b.lengths)] == flat
    v = next(iter(val_loader))
    assert v.img_lengths.tolist()[:10] == [36, 0, 0, 0, 0] * 2 and "words" not in v.extra


# ----------------------------------------------------------------------------- evaluation

def test_evaluate_our_checkpoint(dataset, trained, capsys, tmp_path):
    data_path, _ = dataset
    sims_file = str(tmp_path / "sims.npy")
    out, _ = eval_main(capsys, "--model_path", ckpt_path(trained), "--data_path", data_path,
                       "--split", "test", "--save_sims", sims_file, "--device", "cpu")
    assert "rsum: " in out
    sims = np.load(sims_file)
    assert sims.shape == (6, 30) and sims.dtype == np.float64
    # the same as the model's own embeddings and dot products
    model, opt, vocab, _ = evaluation.load_model(ckpt_path(trained), data_path, device="cpu")
    assert opt.module_name == "HREM"
    loader = evaluation.get_test_loader("test", "synth_precomp", vocab, 8, 0, opt,
                                        matcher=hrem.HREM)
    img, cap, lens = evaluation.encode_data(model, loader, img_stride=loader.dataset.im_div)
    assert img.shape == (6, 16) and cap.shape == (30, 16)
    np.testing.assert_allclose(sims, img.astype(np.float64) @ cap.astype(np.float64).T,
                               atol=1e-12)
    # each image embedded once: the same as embedding it with every caption
    images = torch.from_numpy(np.array(loader.dataset.images[:6]))
    with torch.no_grad():
        again = model.img_enc(images, torch.full((6,), 36))
    np.testing.assert_allclose(img, again.numpy(), atol=1e-6)
    # and in blocks of any size
    np.testing.assert_allclose(model.score(img, cap, lens, shard_size=7), sims, atol=1e-12)


def test_evaluate_original_format_checkpoint(dataset, trained, capsys, tmp_path, monkeypatch):
    """A checkpoint as the original's train.py saves it (two state dicts, its opt, the
    position_ids buffer of older transformers): recognised with no flag, its BERT's config and
    vocabulary from --bert_path (the original ignores its --bert_path and takes
    bert-base-uncased, which an offline machine cannot fetch: a one-line error)."""
    data_path, _ = dataset
    ours = load_checkpoint(ckpt_path(trained))
    img, txt = ours["model"]
    txt = dict(txt, **{hrem.POSITION_IDS: torch.arange(512)[None]})
    path = str(tmp_path / "model_best.pth")
    torch.save({"model": [img, txt], "opt": original_opt(), "epoch": 2, "best_rsum": 0.0,
                "Eiters": 20}, path)
    common = ["--data_path", data_path, "--data_name", "synth_precomp", "--split", "test"]
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    eval_main(capsys, "--model_path", ckpt_path(trained), "--save_sims", a, *common,
              "--device", "cpu")
    eval_main(capsys, "--model_path", path, "--bert_path", BERT_DEMO, "--save_sims", b, *common,
              "--device", "cpu")
    np.testing.assert_array_equal(np.load(a), np.load(b))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = str(tmp_path / "c.npy")
    expect_error(capsys, evaluation.main, ["--model_path", path, "--save_sims", c] + common,
                 "--bert_path bert-base-uncased: ", "pass --bert_path DIR")
    assert not os.path.exists(c)


def test_ensemble_with_a_cross_attention_matcher(dataset, trained, capsys, tmp_path):
    data_path, vocab_path = dataset
    n_vocab = len(deserialize_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    sgr_opt = argparse.Namespace(
        data_name="synth_precomp", vocab_path="/x/vocab", batch_size=128, num_epochs=40,
        lr_update=30, learning_rate=0.0002, grad_clip=2.0, margin=0.2, max_violation=True,
        img_dim=32, word_dim=8, embed_size=16, sim_dim=8, num_layers=1, bi_gru=True,
        no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=3, vocab_size=n_vocab)
    torch.manual_seed(0)
    sgr = str(tmp_path / "SGR.pth.tar")
    torch.save({"epoch": 1, "model": SGRAF(argparse.Namespace(**vars(sgr_opt), device="cpu"))
                .state_dict(), "best_rsum": 0.0, "opt": sgr_opt, "Eiters": 1}, sgr)
    # --vocab_path: the SCAN vocabulary of the cross-attention model (HREM reads BERT's)
    common = ["--data_path", data_path, "--vocab_path", vocab_path, "--split", "test",
              "--device", "cpu"]
    files = [str(tmp_path / ("%s.npy" % k)) for k in ("h", "s", "hs")]
    eval_main(capsys, "--model_path", ckpt_path(trained), "--save_sims", files[0],
              "--data_path", data_path, "--split", "test", "--device", "cpu")
    eval_main(capsys, "--model_path", sgr, "--save_sims", files[1], *common)
    out, _ = eval_main(capsys, "--model_path", ckpt_path(trained), "--model_path2", sgr,
                       "--save_sims", files[2], *common)
    h, s, hs = (np.load(f) for f in files)
    np.testing.assert_allclose(hs, (h + s) / 2, atol=1e-12)
    assert "rsum: " in out


# ----------------------------------------------------------------------------- demo

def test_demo_runs(tmp_path, capsys):
    """demo.py --module_name HREM at a reduced size (its learning is measured at full size:
    README); it ends with the serve.py command of its model."""
    after, before = demo.main(["--module_name", "HREM", "--data_path", str(tmp_path / "d"),
                               "--vocab_path", str(tmp_path / "v"), "--run_dir",
                               str(tmp_path / "r"), "--n_train", "60", "--num_epochs", "1",
                               "--device", "cpu"])
    assert after["sims"].shape == before["sims"].shape == (200, 1000)
    best = str(tmp_path / "r" / "checkpoint" / "model_best.pth.tar")
    ckpt = load_checkpoint(best)
    assert ckpt["opt"].bert_path == BERT_DEMO and ckpt["opt"].embed_size == 256
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "python serve.py" in last, last
    args = serve.build_parser().parse_args(
        shlex.split(last.split("python serve.py", 1)[1].split("  (then")[0]))
    assert args.model_path == best and args.data_path == str(tmp_path / "d")


# ----------------------------------------------------------------------------- bad input

def test_bad_bert_paths(dataset, tmp_path, capsys):
    data_path, vocab_path = dataset
    run = str(tmp_path / "run")

    def train_with(*flags):
        return train_args(data_path, vocab_path, run, *HREM_FLAGS, *flags)

    expect_error(capsys, train.main, train_with("--bert_path", str(tmp_path / "nope")),
                 "--bert_path %s: no such directory" % (tmp_path / "nope"))
    expect_error(capsys, train.main, train_with("--bert_path", vocab_path),
                 "no config.json in this directory")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    expect_error(capsys, train.main, train_with("--bert_path", str(gpt)),
                 "describes a 'gpt2' model, not BERT")
    (gpt / "config.json").write_text("{not json")
    expect_error(capsys, train.main, train_with("--bert_path", str(gpt)), "not readable json")
    expect_error(capsys, train.main, train_with("--bert_init", "pretrained"),
                 "no pretrained weights in this directory", "--bert_init random")
    assert not os.path.exists(run)  # nothing written


def test_bad_flags(dataset, tmp_path, capsys):
    data_path, vocab_path = dataset
    run = str(tmp_path / "run")

    def train_with(*flags):
        return train_args(data_path, vocab_path, run, *HREM_FLAGS, *flags)

    expect_error(capsys, train.main, train_with("--nhead", "5"),
                 "--nhead 5: must divide --embed_size 16")
    expect_error(capsys, train.main, train_with("--threshold", "0.05"), "--threshold 0.05")
    expect_error(capsys, train.main, train_with("--sim_dim", "8"),
                 "does not apply to HREM: it is an option of SGR, SAF")
    expect_error(capsys, train.main, train_with("--batch_size", "200"),
                 "the train split has 100 captions, fewer than one batch")
    expect_error(capsys, train.main,
                 train_args(data_path, vocab_path, run, "--mask_weight", "1.5"),
                 "--mask_weight 1.5: does not apply to SGR: it is an option of HREM")
    opt = opts.parse_opt(HREM_FLAGS)
    with pytest.raises(hrem.errors.UsageError, match="HREM cannot train under torchrun"):
        hrem.HREM.check_opt(opt, distributed=True)
    assert not os.path.exists(run)


def test_bad_evaluation_flags(dataset, trained, tmp_path, capsys, fixtures):
    """A --bert_path whose BERT is not the checkpoint's, and the SCAN vocabulary flag: one
    line each, no similarity file written."""
    data_path, vocab_path = dataset
    tiny = tmp_path / "tiny_bert"
    tiny.mkdir()
    src = fixtures / "hrem_ref" / "hrem_small_seed1"
    (tiny / "config.json").write_text((src / "bert_config.json").read_text())
    (tiny / "vocab.txt").write_bytes((src / "vocab.txt").read_bytes())
    sims = str(tmp_path / "sims.npy")
    common = ["--model_path", ckpt_path(trained), "--data_path", data_path, "--split", "test",
              "--save_sims", sims, "--device", "cpu"]
    expect_error(capsys, evaluation.main, common + ["--bert_path", str(tiny)],
                 "--bert_path ", "tiny_bert: this BERT (hidden size 32, 2 layers, 75 tokens",
                 "(hidden size 128, 2 layers, 193 tokens", "pass --bert_path DIR of the BERT")
    expect_error(capsys, evaluation.main, common + ["--vocab_path", vocab_path],
                 "--vocab_path ", ": does not apply to HREM", "--bert_path")
    assert not os.path.exists(sims)
