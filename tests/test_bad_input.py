"""Bad input gets a one-line error and changes no file (issue 7).

One test per case: data, vocabulary, checkpoints, flags, the run directory, a diverging run;
each asserts the error's class and key, a fragment of its message, the exit code of the CLI,
and that every file that existed before is byte for byte the same after. A fuzz test feeds
corrupted caption files and .npy headers to the loader: every failure must be one of the
errors of errors.py, and whatever loads must run through the model.
"""
import io
import os
import pickletools
import random
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import checks
import data
import errors
import evaluation
import opts
import outputs
import runs
import train
from checkpoint import load_checkpoint, save_checkpoint
from data import PrecompDataset, collate_fn
from helpers import assert_unchanged, expect_exit, snapshot, tiny_dataset, train_args
from model import SGRAF
from vocab import UNK, Vocabulary, load_vocab

REPO = Path(__file__).resolve().parent.parent
N_TRAIN, N_DEV, N_TEST, IMG_DIM = 20, 6, 10, 32


# ----------------------------------------------------------------------------- fixtures

def tiny_opt(data_path, vocab_path, *extra):
    opt = opts.parse_opt(train_args(data_path, vocab_path, "unused", *extra))
    opt.vocab_size = len(load_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    return opt


def write_checkpoint(path, opt):
    save_checkpoint({"epoch": 1, "model": SGRAF(opt).state_dict(), "best_rsum": 0.0,
                     "opt": opt, "Eiters": 0}, False, filename=os.path.basename(path),
                    prefix=os.path.dirname(path) + "/")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny dataset, its vocab, and untrained SGR and SAF checkpoints of its dims."""
    root = tmp_path_factory.mktemp("bad_input")
    data_path, vocab_path = tiny_dataset(str(root), n_train=N_TRAIN, n_dev=N_DEV,
                                         n_test=N_TEST, img_dim=IMG_DIM)
    (root / "ckpt").mkdir()
    for module in ("SGR", "SAF"):
        write_checkpoint(str(root / "ckpt" / ("%s.pth.tar" % module)),
                         tiny_opt(data_path, vocab_path, "--module_name", module))
    return root


class Work:
    """A private copy of `base` for one test."""

    def __init__(self, root):
        self.root = root
        self.data = root / "data"
        self.ds = root / "data" / "synth_precomp"
        self.vocab = root / "vocab"
        self.vocab_file = self.vocab / "synth_precomp_vocab.json"
        self.sgr = root / "ckpt" / "SGR.pth.tar"
        self.saf = root / "ckpt" / "SAF.pth.tar"
        self.run = root / "run"

    def train_args(self, *extra):
        return train_args(str(self.data), str(self.vocab), str(self.run), *extra)

    def eval_args(self, *extra, model=None):
        return ["--model_path", str(model or self.sgr), "--data_path", str(self.data),
                "--vocab_path", str(self.vocab), "--split", "test", "--device", "cpu"] + \
            list(extra)

    def captions(self, split="train"):
        return (self.ds / ("%s_caps.txt" % split)).read_bytes().split(b"\n")[:-1]

    def write_captions(self, lines, split="train"):
        (self.ds / ("%s_caps.txt" % split)).write_bytes(b"\n".join(lines) + b"\n")

    def features(self, split="train"):
        return np.load(self.ds / ("%s_ims.npy" % split))

    def dataset(self, split="train", vocab=None, img_dim=IMG_DIM):
        if vocab is None:
            vocab = load_vocab(str(self.vocab_file))
        return PrecompDataset(str(self.ds), split, vocab, img_dim=img_dim)


@pytest.fixture
def work(base, tmp_path):
    shutil.copytree(base, tmp_path / "w")
    return Work(tmp_path / "w")


def expect_error(key, fn, *args, **kwargs):
    with pytest.raises(errors.SGRAFError) as exc:
        fn(*args, **kwargs)
    assert exc.value.key == key, str(exc.value)
    assert "\n" not in str(exc.value)
    return str(exc.value)


# ----------------------------------------------------------------------------- data

def test_data_directory_missing(work, capsys):
    shutil.rmtree(work.ds)
    # the path's tail: a long temporary folder's path is shortened in the middle
    expect_exit(train.main, work.train_args(), capsys, "data_dir",
                "/w/data/synth_precomp: dataset directory not found",
                "train_ims.npy (or train.h5) and train_caps.txt", root=work.root)


def test_split_file_missing(work, capsys):
    (work.ds / "dev_caps.txt").unlink()
    expect_exit(train.main, work.train_args(), capsys, "split_missing",
                "dev_caps.txt not found", "dev_ims.npy (or dev.h5) and dev_caps.txt",
                root=work.root)
    expect_exit(evaluation.main, work.eval_args("--split", "testall"), capsys, "split_missing",
                "testall_ims.npy and testall_caps.txt not found", root=work.root)


def test_features_not_3d(work, capsys):
    np.save(work.ds / "train_ims.npy", work.features().reshape(N_TRAIN, -1))
    expect_exit(train.main, work.train_args(), capsys, "features_ndim",
                "train_ims.npy: features have shape (20, %d), expected 3-D" % (36 * IMG_DIM),
                root=work.root)


def test_features_wrong_dim(work, capsys):
    expect_exit(train.main, work.train_args("--img_dim", "2048"), capsys, "features_dim",
                "features are 32-dimensional but the model expects img_dim 2048",
                "pass --img_dim 32", root=work.root)


def test_region_count(work, capsys):
    np.save(work.ds / "train_ims.npy", work.features()[:, :35])
    expect_exit(train.main, work.train_args(), capsys, "features_regions",
                "35 regions per image, but the model expects 36 (VisualSA's BatchNorm1d(36))",
                root=work.root)


def test_caption_count(work, capsys):
    lines = work.captions()
    work.write_captions(lines[:7] + lines[8:])  # image 1 has 4 captions: every later pair shifts
    expect_exit(train.main, work.train_args(), capsys, "caption_count",
                "99 captions for the 20 images of train_ims.npy, not 5 per image (100) or 1 "
                "(20)", "shifted", root=work.root)
    # one caption per image is a valid layout
    work.write_captions(lines[::5])
    assert work.dataset().im_div == 1


def test_empty_caption_line(work, capsys):
    lines = work.captions()
    lines[7] = b"   "
    work.write_captions(lines)
    expect_exit(train.main, work.train_args(), capsys, "caption_empty",
                "train_caps.txt: line 8 is empty (1 empty line(s))", root=work.root)


def test_non_utf8_captions_are_replaced_with_a_warning(work, caplog):
    """The decision: replace (U+FFFD, which maps to <unk>) and warn, do not fail."""
    lines = work.captions()
    lines[2] = b"a dog \xff\xfe runs"
    work.write_captions(lines)
    before = snapshot(work.root)
    ds = work.dataset()
    assert "\ufffd" in ds.captions[2]
    assert ds.vocab(UNK) in ds[2][1].tolist()
    assert any("train_caps.txt: 1 line(s) are not valid UTF-8 (first: line 3)" in r.message
               for r in caplog.records if r.levelname == "WARNING")
    assert_unchanged(before, work.root)


def test_nonfinite_features(work, capsys):
    feats = work.features()
    sampled = data.sample_indices(N_TRAIN)
    feats[sampled[-1], 3, 5] = np.inf
    np.save(work.ds / "train_ims.npy", feats)
    expect_exit(train.main, work.train_args(), capsys, "features_nonfinite",
                "image 19 has NaN or Inf features (found in a sample of 8 images)",
                root=work.root)
    # an image outside the start-up sample: only the full check finds it
    unsampled = min(set(range(N_TRAIN)) - set(sampled))
    feats = work.features()
    feats[sampled[-1]] = 0
    feats[unsampled, 0, 0] = np.nan
    np.save(work.ds / "train_ims.npy", feats)
    work.dataset()  # the sample is clean
    expect_exit(checks.main, ["--features", str(work.ds / "train_ims.npy")], capsys,
                "features_nonfinite", "image %d has NaN or Inf features (all 20 images "
                "checked)" % unsampled, root=work.root)
    checks.main(["--features", str(work.ds / "dev_ims.npy")])
    assert "6 images of shape (36, 32), all finite" in capsys.readouterr().out


# ----------------------------------------------------------------------------- vocabulary

def test_vocab_missing(work, capsys):
    work.vocab_file.unlink()
    expect_exit(train.main, work.train_args(), capsys, "vocab_missing",
                "synth_precomp_vocab.json: vocabulary file not found",
                "python vocab.py --data_path DATA --data_name synth_precomp", root=work.root)


@pytest.mark.parametrize("text,reason", [("{not json", "Expecting property name"),
                                         ('{"idx": 3}', "no 'word2idx' entry"),
                                         ('{"word2idx": {"a": 0}, "idx2word": {"0": "a"}, '
                                          '"idx": 1}', "no <pad> token")])
def test_vocab_not_a_vocab(work, capsys, text, reason):
    work.vocab_file.write_text(text)
    expect_exit(train.main, work.train_args(), capsys, "vocab_invalid",
                "not a vocabulary json (%s" % reason, root=work.root)


def test_vocab_of_another_dataset(work, capsys, original_vocab):
    shutil.copy(original_vocab / "f30k_precomp_vocab.json", work.vocab_file)
    n = len(load_vocab(str(work.vocab_file)))
    n_ckpt = load_checkpoint(str(work.sgr))["opt"].vocab_size
    expect_exit(evaluation.main, work.eval_args(), capsys, "vocab_size",
                "%d words, but SGR.pth.tar was trained with %d" % (n, n_ckpt),
                "a vocabulary of another dataset", root=work.root)
    expect_exit(train.main, work.train_args("--resume", str(work.sgr)), capsys, "vocab_size",
                "a vocabulary of another dataset", root=work.root)


def test_oov_rate_reported(work, caplog):
    caplog.set_level("INFO", logger="data")
    work.dataset()
    msg = [r.message for r in caplog.records if "% of caption tokens" in r.message]
    assert len(msg) == 1 and "train_caps.txt: " in msg[0] and "in all 100 captions" in msg[0]
    # a vocabulary of another dataset: most words are <unk>, which is reported as a warning
    v = Vocabulary()
    for word in ("<pad>", "<start>", "<end>", "<unk>", "a"):
        v.add_word(word)
    caplog.clear()
    data.report_oov(work.dataset(vocab=v).captions, v, "caps.txt", max_captions=30)
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any("vocabulary is probably of another dataset" in w for w in warnings)
    assert any("a sample of 25 of 100 captions" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_missing(work, capsys):
    expect_exit(evaluation.main, work.eval_args(model=work.root / "nope.pth.tar"), capsys,
                "ckpt_missing", "nope.pth.tar: checkpoint not found", root=work.root)
    expect_exit(train.main, work.train_args("--resume", str(work.root / "nope.pth.tar")),
                capsys, "ckpt_missing", root=work.root)


@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_truncated(work, capsys, legacy):
    ckpt = load_checkpoint(str(work.sgr))
    path = work.root / "cut.pth.tar"
    buf = io.BytesIO()
    torch.save(ckpt, buf, _use_new_zipfile_serialization=not legacy)
    raw = buf.getvalue()
    for cut in (0, 15, 200, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        expect_error("ckpt_truncated", load_checkpoint, str(path))
    expect_exit(evaluation.main, work.eval_args(model=path), capsys, "ckpt_truncated",
                "cut.pth.tar: the checkpoint is truncated or damaged", root=work.root)


def test_not_a_checkpoint(work, capsys):
    path = work.root / "x.pth.tar"
    for content in (b"hello world\n", bytes(range(256)) * 3):
        path.write_bytes(content)
        expect_error("ckpt_not_torch", load_checkpoint, str(path))
    shutil.copy(work.ds / "test_ims.npy", path)
    expect_exit(evaluation.main, work.eval_args(model=path), capsys, "ckpt_not_torch",
                "x.pth.tar: not a PyTorch checkpoint", root=work.root)
    torch.save(load_checkpoint(str(work.sgr))["model"][0], path)  # a bare state dict
    assert "its keys: fc.bias, fc.weight" in expect_error("ckpt_not_model", load_checkpoint,
                                                          str(path))
    torch.save({"model": [{}, {}], "opt": None}, path)
    expect_error("ckpt_not_model", load_checkpoint, str(path))


def test_checkpoint_of_another_module(work, capsys):
    expect_exit(train.main, work.train_args("--resume", str(work.saf)), capsys, "ckpt_mismatch",
                "--module_name SAF in the checkpoint, --module_name SGR from the flags; 18 "
                "keys missing, 7 keys unexpected; pass --module_name SAF", root=work.root)


def test_checkpoint_of_other_dims(work, capsys):
    expect_exit(train.main, work.train_args("--resume", str(work.sgr), "--embed_size", "24"),
                capsys, "ckpt_mismatch",
                "--embed_size 16 in the checkpoint, --embed_size 24 from the flags; ",
                " keys of other shapes; pass --embed_size 16", root=work.root)
    # keys that no flag explains: another model or code version
    ckpt = load_checkpoint(str(work.sgr))
    ckpt["model"][2]["sim_eval.weight"] = ckpt["model"][2].pop("sim_eval_w.weight")
    model = SGRAF(tiny_opt(str(work.data), str(work.vocab)))
    msg = expect_error("ckpt_foreign", checkpoint.check_checkpoint_matches, model, ckpt, "x.pth")
    assert "missing keys sim_enc.sim_eval_w.weight; unexpected keys sim_enc.sim_eval.weight" \
        in msg


def python2_pickle(pkl, encoding):
    """A protocol-2 pickle of Python 3 rewritten as Python 2 writes `str`: SHORT_BINSTRING
    with the bytes in `encoding` instead of BINUNICODE."""
    ops = list(pickletools.genops(pkl))
    out = bytearray()
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(pkl)
        if op.name == "BINUNICODE" and len(arg.encode(encoding)) < 256:
            out += b"U" + bytes([len(arg.encode(encoding))]) + arg.encode(encoding)
        else:
            out += pkl[pos:end]
    return bytes(out)


def python2_checkpoint(ckpt, path, encoding="latin1"):
    """`ckpt` in the legacy torch format with Python 2 strings, as the python2.7 branch
    (torch 0.4) saved it."""
    buf = io.BytesIO()
    torch.save(ckpt, buf, _use_new_zipfile_serialization=False)
    raw, f = buf.getvalue(), io.BytesIO(buf.getvalue())
    parts = []
    for _ in range(5):  # magic, protocol, system info, the object, the storage keys
        start = f.tell()
        list(pickletools.genops(f))
        parts.append(python2_pickle(raw[start:f.tell()], encoding))
    path.write_bytes(b"".join(parts) + raw[f.tell():])


def test_python27_checkpoint(work, capsys):
    ckpt = load_checkpoint(str(work.sgr))
    ckpt["opt"].logger_name = "runs/caf\u00e9/log"  # Latin-1 bytes: not UTF-8 in Python 3
    old, new = work.root / "py27.pth.tar", work.root / "py3.pth.tar"
    python2_checkpoint(ckpt, old)
    expect_exit(evaluation.main, work.eval_args(model=old), capsys, "ckpt_py2",
                "py27.pth.tar: this looks like a checkpoint of the original python2.7 branch "
                "(Python 2 strings in its pickle", "--convert-py2", root=work.root)
    before = snapshot(work.root)
    checks.main(["--convert-py2", str(old), str(new)])
    assert_unchanged(before, work.root)
    converted = load_checkpoint(str(new))
    assert converted["opt"].logger_name == "runs/caf\u00e9/log"
    assert converted["opt"].module_name == "SGR"
    for a, b in zip(converted["model"], ckpt["model"]):
        assert all(torch.equal(a[k], b[k]) for k in b)
    # the converter never writes over a file
    expect_exit(checks.main, ["--convert-py2", str(old), str(new)], capsys, "file_exists",
                root=work.root)
    # an ASCII-only Python 2 checkpoint loads as it is
    ckpt["opt"].logger_name = "runs/log"
    python2_checkpoint(ckpt, old)
    assert load_checkpoint(str(old))["opt"].module_name == "SGR"


class Payload:
    """Pickles as a call that would create `marker` if it were ever run."""

    def __init__(self, fn, marker):
        self.fn, self.marker = fn, marker

    def __reduce__(self):
        if self.fn == "os.system":  # a module torch blocks outright
            return (os.system, ("touch %s" % self.marker,))
        return (shutil.copyfile, (__file__, self.marker))  # a global that is merely unknown


@pytest.mark.parametrize("fn,name", [("os.system", "posix.system"),
                                     ("shutil.copyfile", "shutil.copyfile")])
def test_checkpoint_with_code_is_refused_unexecuted(work, capsys, fn, name):
    marker = work.root / "marker"
    path = work.root / "evil.pth.tar"
    ckpt = load_checkpoint(str(work.sgr))
    ckpt["opt"].extra = Payload(fn, str(marker))
    torch.save(ckpt, path)
    expect_exit(evaluation.main, work.eval_args(model=path), capsys, "ckpt_refused",
                "evil.pth.tar: refused to load: it pickles %s" % name,
                "nothing in it was run", root=work.root)
    expect_exit(train.main, work.train_args("--resume", str(path)), capsys, "ckpt_refused",
                root=work.root)
    assert not marker.exists()


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags,key,fragment", [
    (["--lr_update", "0"], "lr_update", "--lr_update 0: must be a positive number of epochs"),
    (["--margin", "-0.2"], "margin", "--margin -0.2: a negative margin"),
    (["--batch_size", "1"], "batch_one", "--batch_size 1: a batch of one pair has no negative"),
    (["--batch_size", "11"], "batch_remainder", "leave a last batch of 1 in every epoch"),
    (["--batch_size", "0"], "flag_positive", "--batch_size 0: must be a positive integer"),
    (["--log_step", "0"], "flag_positive", "--log_step 0"),
    (["--learning_rate", "0"], "learning_rate", "--learning_rate 0.0: must be positive"),
    (["--workers", "-1"], "flag_nonnegative", "--workers -1: must not be negative"),
    (["--module_name", "sgr"], "module_name", "--module_name sgr: unknown matcher; pass "
                                              "--module_name one of SGR, SAF, NAAF"),
])
def test_inconsistent_flags(work, capsys, flags, key, fragment):
    expect_exit(train.main, work.train_args(*flags), capsys, key, fragment, root=work.root)
    assert not work.run.exists()


def test_fold5_needs_5000_images(work, capsys):
    expect_exit(evaluation.main, work.eval_args("--fold5"), capsys, "fold5",
                "the test split has 10 images and 50 captions, but 5-fold 1K evaluation needs "
                "5000 images with 5 captions each",
                root=work.root)


def test_cli_prints_one_line_and_exits_2(work):
    proc = subprocess.run([sys.executable, str(REPO / "train.py")] +
                          work.train_args("--lr_update", "0"),
                          capture_output=True, text=True, cwd=str(work.root))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: " + errors.message("lr_update", "--lr_update 0")]


# ----------------------------------------------------------------------------- run directory

def test_existing_run_is_not_overwritten(work, capsys):
    ckpt_dir = work.run / "checkpoint"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(work.sgr, ckpt_dir / "model_best.pth.tar")
    expect_exit(train.main, work.train_args(), capsys, "run_exists",
                "/w/run/checkpoint: already holds model_best.pth.tar of another run; pass "
                "--resume with its model_best.pth.tar to continue it, --overwrite",
                root=work.root)
    shutil.copy(work.sgr, ckpt_dir / "checkpoint_2.pth.tar")
    shutil.copy(work.sgr, ckpt_dir / "checkpoint_10.pth.tar")
    (ckpt_dir / "model_best.pth.tar").unlink()
    expect_exit(train.main, work.train_args(), capsys, "run_exists",
                "/w/run/checkpoint: already holds checkpoint_10.pth.tar",
                root=work.root)
    # what --resume and --overwrite allow
    runs.check_run_dir(str(ckpt_dir), resume=str(ckpt_dir / "checkpoint_10.pth.tar"))
    runs.check_run_dir(str(ckpt_dir), overwrite=True)
    runs.check_run_dir(str(work.root / "new_run"))


# ----------------------------------------------------------------------------- divergence

def test_nan_loss_stops_the_run_and_saves_nothing(work, capsys):
    """NaN features in an image outside the start-up sample: the first batch with it has NaN
    gradients (and a NaN loss, or not, depending on the loss path); the run stops before the
    optimizer step, names the image, and the run's last checkpoint is kept."""
    ckpt_dir = work.run / "checkpoint"
    train.main(work.train_args("--num_epochs", "1", "--seed", "1"))  # checkpoint_0, model_best
    feats = work.features()
    bad = min(set(range(N_TRAIN)) - set(data.sample_indices(N_TRAIN)))
    feats[bad, 4] = np.nan
    np.save(work.ds / "train_ims.npy", feats)
    line = expect_exit(train.main, work.train_args("--num_epochs", "2", "--seed", "1",
                                                   "--resume",
                                                   str(ckpt_dir / "checkpoint_0.pth.tar")),
                       capsys, "diverged_nonfinite", "train_ims.npy: image %d has NaN or Inf "
                       "features, so at iteration " % bad, "nothing was saved",
                       root=work.root, code=1)
    assert " the loss is nan;" in line or " the gradients are not finite (loss " in line
    assert 10 < int(line.split("iteration ")[1].split(" ")[0]) <= 10 + N_TRAIN * 5 // 10
    assert sorted(os.listdir(ckpt_dir)) == [outputs.MARKER, "checkpoint_0.pth.tar",
                                            "model_best.pth.tar"]


def test_nonfinite_gradient_stops_before_the_step(base):
    opt = tiny_opt(str(base / "data"), str(base / "vocab"))
    model = SGRAF(opt)
    runs.stop_on_nonfinite(model)
    before = [p.detach().clone() for p in model.params]
    for p in model.params:
        p.grad = torch.zeros_like(p)
    model.params[0].grad[0] = float("inf")
    model.logger.update("Loss", 1.5)
    msg = expect_error("diverged_start", model.optimizer.step)
    assert "gradients are not finite (loss 1.5) at iteration 0" in msg
    assert all(torch.equal(a, p) for a, p in zip(before, model.params))


# ----------------------------------------------------------------------------- fuzz

@pytest.fixture(scope="module")
def fuzz_model(base):
    model = SGRAF(tiny_opt(str(base / "data"), str(base / "vocab")))
    model.val_start()
    return model


def load_and_run(ds_dir, vocab, model):
    """Load the train split and run two of its items through the model: either this works
    or it raises one of the errors of errors.py."""
    ds = PrecompDataset(str(ds_dir), "train", vocab, img_dim=IMG_DIM)
    images, captions, lengths, _ = collate_fn([ds[0], ds[len(ds) - 1]])
    with torch.no_grad():
        img, cap, lens = model.forward_emb(images, captions, lengths)
        assert model.forward_sim(img, cap, lens).shape == (2, 2)


def names_a_file_of(where, directory, names):
    """`where` is `directory` or one of its files `names`, whole or shortened in the middle
    (errors.shorten_path: a head of the path, "…", a tail of it)."""
    paths = [directory] + [os.path.join(directory, n) for n in names]
    head, cut, tail = where.partition("…")
    if not cut:
        return where.startswith(directory)
    return any(p.startswith(head) and p.endswith(tail) for p in paths)


def run_fuzz(work, model, corrupt, n_cases, seed):
    vocab = load_vocab(str(work.vocab_file))
    files = {p.name: p.read_bytes() for p in work.ds.iterdir()}
    outcomes = {}
    for case in range(n_cases):
        rng = random.Random(seed * 1000 + case)
        for name, content in files.items():
            (work.ds / name).write_bytes(content)
        corrupt(rng)
        try:
            load_and_run(work.ds, vocab, model)
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        except errors.SGRAFError as e:
            msg = str(e)
            assert e.key in errors.PROBLEMS and "\n" not in msg, msg
            assert names_a_file_of(msg.split(": ", 1)[0], str(work.ds), files), msg
            outcomes[e.key] = outcomes.get(e.key, 0) + 1
    return outcomes


def test_fuzz_caption_files(work, fuzz_model):
    path = work.ds / "train_caps.txt"
    good = path.read_bytes()

    def corrupt(rng):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(8)
            lines = bytes(data).split(b"\n")
            i = rng.randrange(len(lines))
            if op == 0:                                   # a line lost
                del lines[i]
            elif op == 1:                                 # a line doubled
                lines.insert(i, lines[i])
            elif op == 2:                                 # a blank line
                lines.insert(i, rng.choice([b"", b" ", b"\r", b"\t"]))
            elif op == 3:                                 # random bytes in a line
                lines[i] += bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
            elif op == 4:                                 # cut anywhere
                lines = bytes(data[:rng.randrange(len(data) + 1)]).split(b"\n")
            elif op == 5:                                 # CRLF line ends
                lines = [line + b"\r" for line in lines]
            elif op == 6:                                 # one byte flipped
                j = rng.randrange(len(data))
                data[j] ^= 1 << rng.randrange(8)
                lines = bytes(data).split(b"\n")
            else:                                         # odd but valid text
                lines[i] = "".join(rng.choice(string.printable + "\u00e9\u4e2d\u200b")
                                   for _ in range(20)).encode()
            data = bytearray(b"\n".join(lines))
        path.write_bytes(bytes(data))

    outcomes = run_fuzz(work, fuzz_model, corrupt, 80, seed=1)
    assert outcomes.get("loaded") and outcomes.get("caption_count") and \
        outcomes.get("caption_empty"), outcomes


def test_fuzz_npy_headers(work, fuzz_model):
    path = work.ds / "train_ims.npy"
    good = path.read_bytes()
    header_len = good.index(b"\n") + 1
    header = good[:header_len]
    edits = [(b"(20, 36, 32)", s) for s in (b"(20, 36, 31)", b"(20, 35, 32)", b"(20, 36)",
                                            b"(0, 36, 32)", b"(21, 36, 32)", b"(4, 36, 32)",
                                            b"(20, 36, 32, 1)", b"(-20, 36, 32)", b"()",
                                            b"(99999999999999999999, 36, 32)")] + \
        [(b"'<f4'", s) for s in (b"'<f8'", b"'<f2'", b"'>f4'", b"'<i4'", b"'|O'", b"'<U1'",
                                 b"'|b1'", b"'<c8'", b"'xyz'")] + \
        [(b"False", b"True"), (b"False", b"Nope"), (b"NUMPY", b"NUMPZ"), (b"\x01\x00", b"\x09\x00")]

    def corrupt(rng):
        data = bytearray(good)
        op = rng.randrange(4)
        if op == 0:                                       # a field of the header changed
            old, new = rng.choice(edits)
            data = bytearray(header.replace(old, new) + good[header_len:])
        elif op == 1:                                     # random bytes of the header flipped
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(header_len)] = rng.randrange(256)
        elif op == 2:                                     # cut in the header or the data
            data = data[:rng.choice([rng.randrange(header_len), rng.randrange(len(data))])]
        else:                                             # garbage appended or prepended
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            data = bytearray(junk + data if rng.random() < 0.5 else data + junk)
        path.write_bytes(bytes(data))

    outcomes = run_fuzz(work, fuzz_model, corrupt, 120, seed=2)
    assert outcomes.get("features_unreadable") and outcomes.get("loaded"), outcomes


# ----------------------------------------------------------------------------- the table

def test_troubleshooting_table_is_up_to_date():
    path = REPO / "TROUBLESHOOTING.md"
    assert path.read_text(encoding="utf-8") == checks.render_table(), \
        "regenerate it: python checks.py --table > TROUBLESHOOTING.md"


def test_every_message_is_one_line_with_a_fix():
    for key, p in errors.PROBLEMS.items():
        fields = {name: 1 for text in (p.problem, p.fix)
                  for _, name, _, _ in string.Formatter().parse(text)
                  if name and name != "where"}
        msg = errors.message(key, "FILE", **fields)
        assert msg.startswith("FILE: ") and "; " in msg and "\n" not in msg, key
        assert p.cls in (errors.Warn, errors.Info) or issubclass(p.cls, errors.SGRAFError)


def test_readme_links_the_troubleshooting_table_without_a_copy():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "[TROUBLESHOOTING.md](TROUBLESHOOTING.md)" in text
    rows = [l for l in checks.render_table().splitlines() if l.startswith("| ")]
    assert not [r for r in rows[1:] if r in text], "README repeats the table: link it instead"
