"""Every command line, tried as a new user would (issue 18): nothing written over what the user
did not ask to replace, every check before the compute, no traceback for a plausible mistake.

`MISTAKES` is a table of plausible mistakes, at least five per command, each run in-process
(`main(argv)`) in a private copy of a small workspace: it must exit with code 2 and one
`error:` line of the expected problem, and leave every file there (and the shipped vocab/) as
it was, writing nothing. A new command is one line in `COMMANDS` plus its rows. The cases the
issue lists are the tests after the table, each with its exit code, its message and the hashes
of every pre-existing file.
"""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import checks
import demo
import errors
import evaluation
import model
import np2h
import opts
import outputs
import runs
import synthetic
import train
import vocab
from checkpoint import load_checkpoint, save_checkpoint
from data import PrecompDataset
from helpers import assert_unchanged, expect_exit, snapshot, tiny_dataset, train_args
from vocab import UNK, build_vocab, load_vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")

# command -> (module, function): its main(argv)
COMMANDS = {
    "train.py": ("train", "main"),
    "evaluation.py": ("evaluation", "main"),
    "demo.py": ("demo", "main"),
    "vocab.py": ("vocab", "vocab_command"),  # vocab.py's main guard runs it
    "np2h.py": ("np2h", "main"),
    "checks.py": ("checks", "main"),
    "synthetic.py": ("synthetic", "main"),
    "bench.py": ("bench", "main"),
    "retrieve.py": ("retrieve", "main"),
}

# the workspace (see `base`), as relative paths from its root, the working directory
TINY = ("--data_name synth_precomp --workers 0 --batch_size 10 --device cpu --img_dim 32 "
        "--embed_size 16 --word_dim 8 --sim_dim 8")
T = "--data_path data --vocab_path vocab --model_name runs/new/checkpoint " \
    "--logger_name runs/new/log " + TINY
E = "--model_path ckpt/SGR.pth.tar --data_path data --vocab_path vocab --split test " \
    "--device cpu"
T_OTHER = T.replace(" --sim_dim 8", "")  # for the matchers without --sim_dim
D = "--data_path data --vocab_path vocab --device cpu --run_dir runs/demo"
D2 = "--data_path fresh --vocab_path freshvocab --device cpu --run_dir runs/demo"
R = "--model_path ckpt/SGR.pth.tar --data_path data --vocab_path vocab --split test " \
    "--device cpu --no_cache"
MINE = "--model_name runs/mine/checkpoint --logger_name runs/mine/log"

# (command, arguments, the problem's key)
MISTAKES = [
    ("train.py", T + " --device gpu", "device"),
    ("train.py", T + " --device cuda:99", "device_unavailable"),
    ("train.py", T + " --num_epochs 0", "flag_positive"),
    ("train.py", T + " --batch_size 0", "flag_positive"),
    ("train.py", T + " --seed -1", "flag_nonnegative"),
    ("train.py", T + " --learning_rate 2e-4x", "arguments"),
    ("train.py", T + " --feat_format hdf5", "arguments"),
    ("train.py", T + " --num_epoch 3", "arguments"),
    ("train.py", T + " --resume runs/mine/checkpoint", "path_not_file"),
    ("train.py", T + " --data_path notes.txt", "path_not_dir"),
    ("train.py", T + " --vocab_path notes.txt", "path_not_dir"),
    ("train.py", T + " --data_name synth_precomp/", "data_name"),
    ("train.py", T + " --model_name ''", "dir_missing"),
    ("train.py", T + " --world_size 2", "world_size_plain"),
    ("train.py", T + " --resume ckpt/SGR.pth.tar " + MINE, "run_exists"),
    ("train.py", T + " --num_epochs 1 --resume runs/mine/checkpoint/checkpoint_0.pth.tar "
     + MINE, "resume_done"),
    ("train.py", T + " --logger_name runs/mine/log", "log_exists"),
    ("train.py", T_OTHER + " --module_name GSMN --num_block 0", "flag_positive"),
    ("train.py", T_OTHER + " --module_name GSMN --bbox_mode weird", "arguments"),
    ("train.py", T_OTHER + " --module_name HREM --bert_path notes.txt", "path_not_dir"),
    ("train.py", T + " --lr_update 0", "lr_update"),
    ("train.py", T.replace("--data_path data", "--data_path data/synth_precomp"),
     "data_dir_nested"),
    ("train.py", T + " --margin -0.2", "margin"),
    ("evaluation.py", E + " --model_path runs/mine/checkpoint", "path_not_file"),
    ("evaluation.py", E + " --model_path2 runs/mine", "path_not_file"),
    ("evaluation.py", E + " --model_path nope.pth.tar", "ckpt_missing"),
    ("evaluation.py", E + " --model_path data/synth_precomp/test_ims.npy", "ckpt_not_torch"),
    ("evaluation.py", E + " --device cuda:99", "device_unavailable"),
    ("evaluation.py", E + " --device gpu", "device"),
    ("evaluation.py", E + " --split val", "split_missing"),
    ("evaluation.py", E + " --precision fp16", "arguments"),
    ("evaluation.py", E + " --data_path notes.txt", "path_not_dir"),
    ("evaluation.py", E + " --data_path data/synth_precomp", "data_dir_nested"),
    ("evaluation.py", E + " --vocab_path notes.txt", "path_not_dir"),
    ("evaluation.py", E + " --data_name one_precomp", "eval_captions"),
    ("evaluation.py", E + " --data_name one_precomp --fold5", "fold5"),
    ("demo.py", D + " --module_name sgr", "module_name"),
    ("demo.py", D + " --num_epochs 0", "flag_positive"),
    ("demo.py", D + " --n_train 0", "flag_positive"),
    ("demo.py", D + " --threads -1", "flag_positive"),
    ("demo.py", D + " --seed -3", "flag_nonnegative"),
    ("demo.py", D + " --device gpu", "device"),
    ("demo.py", D + " --run_dir notes.txt", "path_not_dir"),
    ("demo.py", D + " --data_path notes.txt", "path_not_dir"),
    ("demo.py", D + " --bogus 1", "arguments"),
    ("demo.py", D + " --two_stage --module_name HREM", "flag_unsupported"),
    ("demo.py", D + " --two_stage --rerank_k 0", "arguments"),
    ("demo.py", D2 + " --two_stage --sim_dim 8", "flag_unsupported"),  # HREM refuses it first
    ("evaluation.py", E + " --rerank_k 8", "rerank_needs_shortlist"),
    ("evaluation.py", E + " --rerank_k 8,x", "arguments"),
    ("demo.py", D + " --module_name NAAF --sim_dim 8", "flag_unsupported"),
    ("demo.py", D, "synthetic_mismatch"),  # data/synth_precomp was made with other sizes
    ("demo.py", D2 + " --logger_name runs/mine/log", "log_exists"),
    ("demo.py", D2 + " --model_name notes.txt", "path_not_dir"),
    ("vocab.py", "--data_path missing", "dir_missing"),
    ("vocab.py", "--data_path notes.txt", "path_not_dir"),
    ("vocab.py", "--data_path data --data_name nope_precomp", "data_dir"),
    ("vocab.py", "--data_path data/synth_precomp --data_name synth_precomp", "data_dir_nested"),
    ("vocab.py", "--data_path data --data_name one_precomp", "split_missing"),
    ("vocab.py", "--data_path data --data_name synth_precomp --threshold 0", "flag_min"),
    ("vocab.py", "--data_path data --data_name synth_precomp --threshold four", "arguments"),
    ("vocab.py", "--data_path data --data_name synth_precomp", "file_exists"),
    ("np2h.py", "--data_path feats --chunk -5", "flag_positive"),
    ("np2h.py", "--data_path missing", "dir_missing"),
    ("np2h.py", "--data_path notes.txt", "path_not_dir"),
    ("np2h.py", "--data_path feats --splits nope", "features_missing"),
    ("np2h.py", "--data_path feats --splits dir", "path_not_file"),
    ("np2h.py", "--data_path feats --splits ints", "features_dtype"),
    ("np2h.py", "--data_path feats --splits flat", "features_ndim"),
    ("np2h.py", "--data_path feats --splits broken", "features_unreadable"),
    ("np2h.py", "--data_path feats --splits train empty", "features_empty"),
    ("np2h.py", "--data_path feats --splits nan", "features_nonfinite"),
    ("np2h.py", "--data_path feats --splits foreign", "file_exists"),
    ("np2h.py", "--data_path feats --splits train,dir", "split_name"),
    ("np2h.py", "--data_path feats --splits train_ims.npy", "split_name"),
    ("checks.py", "", "arguments"),
    ("checks.py", "--table --features x.npy", "arguments"),
    ("checks.py", "--convert-py2 missing.pth.tar out.pth.tar", "ckpt_missing"),
    ("checks.py", "--convert-py2 runs/mine out.pth.tar", "path_not_file"),
    ("checks.py", "--convert-py2 ckpt/SGR.pth.tar notes.txt", "file_exists"),
    ("checks.py", "--convert-py2 ckpt/SGR.pth.tar runs", "path_not_file"),
    ("checks.py", "--convert-py2 ckpt/SGR.pth.tar notes.txt/out.pth.tar", "path_not_dir"),
    ("checks.py", "--features missing.npy", "features_missing"),
    ("checks.py", "--features data", "path_not_file"),
    ("checks.py", "--features notes.txt", "features_unreadable"),
    ("checks.py", "--features data/synth_precomp/test_ims.npy --img_dim 64", "features_dim"),
    ("checks.py", "--features data/synth_precomp/test_ims.npy --img_dim 0", "flag_positive"),
    ("synthetic.py", "--n_test -1", "flag_positive"),
    ("synthetic.py", "--img_dim 0", "flag_positive"),
    ("synthetic.py", "--n_regions 4", "flag_min"),
    ("synthetic.py", "--seed -1", "flag_nonnegative"),
    ("synthetic.py", "--data_path notes.txt", "path_not_dir"),
    ("synthetic.py", "--vocab_path notes.txt", "path_not_dir"),
    ("synthetic.py", "--data_name a/b", "data_name"),
    ("synthetic.py", "--data_path data --vocab_path vocab", "synthetic_mismatch"),
    ("synthetic.py", "--data_path data --data_name one_precomp", "dataset_foreign"),
    ("synthetic.py", "--data_path other --vocab_path vocab", "file_exists"),
    ("bench.py", "--device gpu", "device"),
    ("bench.py", "--modules SGR,XYZ", "flag_choice"),
    ("bench.py", "--what evaluate", "flag_choice"),
    ("bench.py", "--n_img 0", "flag_positive"),
    ("bench.py", "--threads 0", "flag_positive"),
    ("bench.py", "--steps 0", "flag_positive"),
    ("bench.py", "--min_len 30 --max_len 20", "flag_order"),
    ("bench.py", "--batch 1", "flag_min"),
    ("bench.py", "--vocab_size 3", "flag_min"),
    ("bench.py", "--precision fp16", "flag_choice"),  # a comma-separated list, as --modules
    ("bench.py", "--hrem_bert large", "flag_choice"),
    ("bench.py", "--hrem_n_img 0", "flag_positive"),
    ("bench.py", "--gsmn_original nowhere", "dir_missing"),
    # argparse's own mistakes: one line, not its usage block
    ("retrieve.py", R, "arguments"),  # neither --query nor --image
    ("retrieve.py", R + " --query dog --image 1", "arguments"),
    ("retrieve.py", R + " --image one", "arguments"),
    ("retrieve.py", R + " --query dog --feat_format hdf5", "arguments"),
    ("retrieve.py", R + " --query dog --bogus 1", "arguments"),
    ("retrieve.py", R + " --query dog --topk 0", "flag_positive"),
    ("retrieve.py", R + " --query ' '", "query_empty"),
]


def command(name):
    module, function = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def split_args(text):
    import shlex
    return shlex.split(text)


def write_checkpoint(path, opt, epoch=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint({"epoch": epoch, "model": model.SGRAF(opt).state_dict(), "best_rsum": 0.0,
                     "opt": opt, "Eiters": 0}, False, filename=os.path.basename(path),
                    prefix=os.path.dirname(path) + "/")


def tiny_opt(root, *extra, img_dim=32, data_name="synth_precomp"):
    opt = opts.parse_opt(train_args(os.path.join(root, "data"), os.path.join(root, "vocab"),
                                    "unused", "--img_dim", str(img_dim), "--data_name",
                                    data_name, *extra))
    opt.vocab_size = len(load_vocab(os.path.join(root, "vocab",
                                                       "synth_precomp_vocab.json")))
    return opt


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The workspace every row starts from: a tiny dataset and its vocabulary, a checkpoint,
    a user's run in runs/mine, a text file, a split with one caption per image, and feature
    files for np2h.py."""
    root = str(tmp_path_factory.mktemp("cli"))
    tiny_dataset(root, n_train=20, n_dev=6, n_test=10, img_dim=32)
    write_checkpoint(os.path.join(root, "ckpt", "SGR.pth.tar"), tiny_opt(root))
    mine = os.path.join(root, "runs", "mine")
    os.makedirs(os.path.join(mine, "log"))
    for name in ("checkpoint_0.pth.tar", "model_best.pth.tar"):
        write_checkpoint(os.path.join(mine, "checkpoint", name), tiny_opt(root))
    with open(os.path.join(mine, "log", "events.out.tfevents.1.host"), "wb") as f:
        f.write(b"the user's curves")
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not a directory\n")
    one = os.path.join(root, "data", "one_precomp")
    os.makedirs(one)
    shutil.copy(os.path.join(root, "data", "synth_precomp", "test_ims.npy"), one)
    with open(os.path.join(root, "data", "synth_precomp", "test_caps.txt")) as f:
        caps = f.read().splitlines()[::5]
    with open(os.path.join(one, "test_caps.txt"), "w") as f:
        f.write("".join(c + "\n" for c in caps))
    shutil.copy(os.path.join(root, "vocab", "synth_precomp_vocab.json"),
                os.path.join(root, "vocab", "one_precomp_vocab.json"))
    feats = os.path.join(root, "feats")
    os.makedirs(os.path.join(feats, "dir_ims.npy"))
    x = np.random.default_rng(0).random((5, 36, 4), dtype=np.float32)
    np.save(os.path.join(feats, "train_ims.npy"), x)
    np.save(os.path.join(feats, "ints_ims.npy"), (x * 10).astype(np.int32))
    np.save(os.path.join(feats, "flat_ims.npy"), x.reshape(5, -1))
    np.save(os.path.join(feats, "empty_ims.npy"), x[:0])
    np.save(os.path.join(feats, "foreign_ims.npy"), x)
    with open(os.path.join(feats, "foreign.h5"), "wb") as f:
        f.write(b"someone's h5")
    x[3, 2, 1] = np.nan
    np.save(os.path.join(feats, "nan_ims.npy"), x)
    with open(os.path.join(feats, "train_ims.npy"), "rb") as f:
        raw = f.read()
    with open(os.path.join(feats, "broken_ims.npy"), "wb") as f:
        f.write(raw[:60])
    return root


@pytest.fixture
def work(base, tmp_path, monkeypatch):
    """A private copy of the workspace, as the working directory."""
    root = tmp_path / "w"
    shutil.copytree(base, root)
    monkeypatch.chdir(root)
    return root


@pytest.fixture(scope="module")
def shipped():
    """The shipped vocabularies, which no test may change."""
    before = snapshot(os.path.join(REPO, "vocab"))
    yield
    assert_unchanged(before, os.path.join(REPO, "vocab"))


def test_every_command_has_five_mistakes():
    counts = {name: sum(row[0] == name for row in MISTAKES) for name in COMMANDS}
    assert all(n >= 5 for n in counts.values()), counts
    assert {key for _, _, key in MISTAKES} <= set(errors.PROBLEMS)


@pytest.mark.parametrize("name,args,key", MISTAKES,
                         ids=["%s %s" % (n, a[-60:]) for n, a, _ in MISTAKES])
def test_mistake(work, shipped, capsys, name, args, key):
    expect_exit(command(name), split_args(args), capsys, key, root=work, new_allowed=False)


# ----------------------------------------------------------------------------- the listed cases

# (command, arguments, key, fragments of the message): the tracebacks and late checks
LISTED = [
    ("vocab.py", "--data_path missing_data", "dir_missing",
     ["--data_path missing_data: directory not found"]),
    ("vocab.py", "--data_path data --data_name deep/x", "data_name",
     ["--data_name deep/x: is a path, not a dataset name", "pass --data_path deep --data_name x"]),
    ("vocab.py", "--data_path data --data_name synth_precomp --vocab_path notes.txt",
     "path_not_dir", ["--vocab_path notes.txt: notes.txt is a file, not a directory"]),
    ("train.py", T.replace("runs/new/checkpoint", "notes.txt"), "path_not_dir",
     ["--model_name notes.txt: notes.txt is a file, not a directory"]),
    ("train.py", T.replace("runs/new/log", "notes.txt"), "path_not_dir",
     ["--logger_name notes.txt: notes.txt is a file, not a directory"]),
    ("np2h.py", "--data_path feats --chunk 0", "flag_positive",
     ["--chunk 0: must be a positive integer"]),
    ("synthetic.py", "--n_train 0", "flag_positive", ["--n_train 0: must be a positive integer"]),
    ("evaluation.py", E + " --data_name %s" % os.path.join(os.sep, "abs", "synth_precomp"),
     "data_name", ["is a path, not a dataset name",
                   "pass --data_path %s --data_name synth_precomp" % os.path.join(os.sep, "abs")]),
    ("evaluation.py", E + " --data_name synth_precomp/", "data_name",
     ["--data_name synth_precomp/: is a path", "pass --data_path data --data_name synth_precomp"]),
    ("retrieve.py", R, "arguments",
     ["retrieve.py: ", "one of the arguments --query --image is required",
      "python retrieve.py --help"]),
]


@pytest.mark.parametrize("name,args,key,fragments", LISTED,
                         ids=["%s %s" % (n, a[-50:]) for n, a, _, _ in LISTED])
def test_listed_case(work, shipped, capsys, name, args, key, fragments):
    expect_exit(command(name), split_args(args), capsys, key, *fragments, root=work,
                new_allowed=False)


# demo.py ---------------------------------------------------------------------

@pytest.fixture
def fake_demo(monkeypatch):
    """demo.py with its compute replaced: what it would pass to train.py."""
    calls = []

    def fake_train(flags):
        calls.append(list(flags))
        opt = opts.parse_opt(flags)
        os.makedirs(opt.model_name, exist_ok=True)
        with open(os.path.join(opt.model_name, runs.BEST), "wb") as f:
            f.write(b"demo's")
    monkeypatch.setattr(demo.train, "main", fake_train)
    monkeypatch.setattr(demo.evaluation, "evalrank", lambda *a, **k: {"rsum": 1.0})
    monkeypatch.setattr(demo.retrieve, "retrieve", lambda *a, **k: {"query": "", "results": []})
    monkeypatch.setattr(demo.retrieve, "format_table", lambda hits: "")
    monkeypatch.setattr(demo, "save_untrained",
                        lambda flags, path: open(path, "wb").write(b"untrained"))
    monkeypatch.setattr(demo.synthetic, "make_synthetic", lambda *a, **k: None)
    return calls


DEMO = ["--data_path", "fresh", "--vocab_path", "freshvocab", "--device", "cpu"]


def test_demo_never_replaces_a_named_run(work, shipped, capsys, fake_demo):
    """`demo.py --run_dir runs/mine` used to replace the user's checkpoints (demo passed
    --overwrite to train.py); `--model_name runs/mine/checkpoint` replaced model_best, then a
    traceback. Both are refused before anything is written."""
    expect_exit(demo.main, ["--run_dir", "runs/mine"] + DEMO, capsys, "run_dir",
                "--run_dir runs/mine: holds checkpoint/checkpoint_0.pth.tar and "
                "checkpoint/model_best.pth.tar and 1 more file(s) of another run",
                "pass another --run_dir, or --overwrite to replace it",
                root=work, new_allowed=False)
    expect_exit(demo.main, ["--model_name", "runs/mine/checkpoint"] + DEMO, capsys,
                "run_exists", "runs/mine/checkpoint: already holds model_best.pth.tar and "
                "checkpoint_0.pth.tar of another run", root=work, new_allowed=False)
    assert not fake_demo


def test_demo_replaces_only_its_own_default_run(work, shipped, capsys, fake_demo):
    demo.main(DEMO)  # the default runs/demo_SGR: a new directory, marked as the demo's
    assert "--overwrite" not in fake_demo[-1]
    assert outputs.made_record("runs/demo_SGR")["made_by"] == "demo.py"
    demo.main(DEMO)  # its own earlier run: replaced
    assert "--overwrite" in fake_demo[-1]
    # a named directory, even one an earlier demo wrote, is never replaced unless asked
    demo.main(DEMO + ["--run_dir", "runs/named"])
    assert "--overwrite" not in fake_demo[-1]
    expect_exit(demo.main, DEMO + ["--run_dir", "runs/named"], capsys, "run_dir",
                root=work, new_allowed=False)
    demo.main(DEMO + ["--run_dir", "runs/named", "--overwrite"])
    assert fake_demo[-1].count("--overwrite") == 1
    # the default directory holding a run the demo did not make is refused
    shutil.rmtree("runs/demo_SGR")
    shutil.copytree("runs/mine", "runs/demo_SGR")
    n = len(fake_demo)
    expect_exit(demo.main, DEMO, capsys, "run_dir", "runs/demo_SGR: holds",
                "of a run that demo.py did not make", root=work, new_allowed=False)
    assert len(fake_demo) == n


# vocab.py --------------------------------------------------------------------

def caption_dir(root, name, lines):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    for split in ("train", "dev"):
        with open(os.path.join(d, "%s_caps.txt" % split), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))


def test_vocab_never_rewrites_the_shipped_vocabulary(work, shipped, capsys):
    """`python vocab.py --data_path MYDATA` from the repository root (default --data_name
    f30k_precomp, --vocab_path vocab) used to rewrite the shipped vocab/f30k_precomp_vocab.json."""
    shutil.copy(os.path.join(REPO, "vocab", "f30k_precomp_vocab.json"), "vocab")
    caption_dir("MYDATA", "f30k_precomp", ["a dog runs"] * 4)
    expect_exit(vocab.vocab_command, ["--data_path", "MYDATA"], capsys, "file_shipped",
                "vocab/f30k_precomp_vocab.json: is the original file "
                "vocab/f30k_precomp_vocab.json shipped with this repository",
                "pass another --vocab_path", root=work, new_allowed=False)


def test_vocab_never_replaces_an_existing_vocabulary(work, shipped, capsys):
    caption_dir("MYDATA", "mine_precomp", ["a dog runs", "a cat sits"] * 4)
    os.makedirs("out")
    with open("out/mine_precomp_vocab.json", "w") as f:
        f.write("{}")
    expect_exit(vocab.vocab_command, ["--data_path", "MYDATA", "--data_name", "mine_precomp",
                                      "--vocab_path", "out"], capsys, "file_exists",
                "out/mine_precomp_vocab.json: already exists; pass --overwrite to replace it, "
                "or another --vocab_path", root=work, new_allowed=False)
    argv = ["--data_path", "MYDATA", "--data_name", "mine_precomp", "--vocab_path", "out",
            "--threshold", "2"]
    assert vocab.vocab_command(argv + ["--overwrite"]) == 0
    words = json.load(open("out/mine_precomp_vocab.json"))["word2idx"]
    assert list(words)[4:] == ["a", "dog", "runs", "cat", "sits"]
    before = snapshot(work)
    assert vocab.vocab_command(argv) == 0  # built by vocab.py from the same captions
    assert "is up to date" in capsys.readouterr().out
    assert_unchanged(before, work, new_allowed=False)
    with open("MYDATA/mine_precomp/train_caps.txt", "a") as f:
        f.write("a bird\n")
    expect_exit(vocab.vocab_command, argv, capsys, "file_exists",
                "(built by vocab.py from other captions or another --threshold)", root=work)


# vocabularies: ids -------------------------------------------------------------

@pytest.mark.parametrize("change,reason", [
    (lambda w: w.update(dog=w["a"]), "have the same id"),
    (lambda w: w.update(dog=len(w)), "outside 0..%d"),
    (lambda w: w.update(dog=-1), "the id of 'dog' is -1, outside"),
    (lambda w: w.update(dog="7"), "the id of 'dog' is '7', not an integer"),
    (lambda w: w.update(dog=7.0), "the id of 'dog' is 7.0, not an integer"),
    (lambda w: w.pop("<end>"), "no <end> token"),
])
def test_vocabulary_ids_are_checked(work, shipped, capsys, change, reason):
    """A duplicate id used to be accepted and to change the results; an id out of range,
    negative or a string gave an IndexError or TypeError traceback."""
    path = "vocab/synth_precomp_vocab.json"
    d = json.load(open(path))
    change(d["word2idx"])
    with open(path, "w") as f:
        json.dump(d, f)
    if "%d" in reason:
        reason = reason % (len(d["word2idx"]) - 1)
    expect_exit(evaluation.main, split_args(E), capsys, "vocab_invalid",
                "synth_precomp_vocab.json: not a vocabulary json (", reason, root=work,
                new_allowed=False)
    expect_exit(train.main, split_args(T), capsys, "vocab_invalid", reason, root=work,
                new_allowed=False)


def test_shipped_vocabularies_pass_the_id_checks(original_vocab):
    import naaf
    for name in ("f30k_precomp_vocab.json", "coco_precomp_vocab.json"):
        load_vocab(str(original_vocab / name))
    for name in ("f30k_precomp.json", "coco_precomp.json"):
        load_vocab(str(original_vocab / "naaf" / name), loader=naaf.load_naaf_vocab)
    for name in outputs.SHIPPED.values():  # the hashes are those of the shipped files
        assert outputs.shipped_file(os.path.join(REPO, name)) == name


# evaluation.py --fold5 ---------------------------------------------------------

def test_fold5_on_5000_images_with_5000_captions_is_refused_before_compute(
        work, shipped, capsys, monkeypatch):
    """It used to pass the start-up check, compute for minutes, print a wrong fold, then
    raise an IndexError: 5000 images need their 25000 captions."""
    d = os.path.join("data5k", "coco_precomp")
    os.makedirs(d)
    np.save(os.path.join(d, "testall_ims.npy"), np.ones((5000, 36, 2), np.float32))
    with open(os.path.join(d, "testall_caps.txt"), "w") as f:
        f.write("a dog runs\n" * 5000)
    shutil.copy("vocab/synth_precomp_vocab.json", "vocab/coco_precomp_vocab.json")
    write_checkpoint("ckpt/coco.pth.tar", tiny_opt(str(work), img_dim=2,
                                                   data_name="coco_precomp"))

    def no_compute(*a, **k):
        raise AssertionError("encoded before the check")
    monkeypatch.setattr(evaluation, "encode_data", no_compute)
    argv = ["--model_path", "ckpt/coco.pth.tar", "--data_path", "data5k", "--vocab_path",
            "vocab", "--split", "testall", "--device", "cpu"]
    expect_exit(evaluation.main, argv + ["--fold5"], capsys, "fold5",
                "--fold5: the testall split has 5000 images and 5000 captions, but 5-fold 1K "
                "evaluation needs 5000 images with 5 captions each", root=work,
                new_allowed=False)
    expect_exit(evaluation.main, argv, capsys, "eval_captions",
                "testall_caps.txt: 5000 captions for 5000 images: R@K needs 5 captions per "
                "image", root=work, new_allowed=False)


# captions with a byte-order mark ------------------------------------------------

def test_caption_file_with_a_byte_order_mark_keeps_its_first_word(work):
    path = os.path.join("data", "synth_precomp", "train_caps.txt")
    raw = open(path, "rb").read()
    first = raw.split(b"\n")[0].decode().split()[0].lower()
    vocab = load_vocab("vocab/synth_precomp_vocab.json")
    assert vocab(first) != vocab(UNK)
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw)
    ds = PrecompDataset(os.path.join("data", "synth_precomp"), "train", vocab)
    assert ds.captions[0].split()[0].lower() == first
    assert ds[0][1][1] == vocab(first)
    assert build_vocab("data", "synth_precomp").word2idx == \
        vocab.word2idx  # the vocabulary counts it too


# train.py: runs, logs, divergence -------------------------------------------------

def run_args(run, *extra):
    return split_args(TINY) + ["--data_path", "data", "--vocab_path", "vocab", "--model_name",
                               os.path.join(run, "checkpoint"), "--logger_name",
                               os.path.join(run, "log"), "--log_step", "1000", "--seed", "0",
                               *extra]


def events(run):
    return sorted(n for n in os.listdir(os.path.join(run, "log")) if "tfevents" in n)


def test_rerun_with_fewer_epochs_leaves_no_file_of_the_earlier_run(work, shipped, capsys):
    """Rerunning into a run directory with fewer epochs used to leave the earlier run's
    checkpoint_1 beside the new checkpoint_0, and the "pass --resume" advice pointed at it."""
    ckpt_dir = os.path.join("runs", "a", "checkpoint")
    train.main(run_args("runs/a", "--num_epochs", "2"))
    old_events = events("runs/a")
    expect_exit(train.main, run_args("runs/a", "--num_epochs", "1"), capsys, "run_exists",
                "already holds model_best.pth.tar and checkpoint_1.pth.tar of another run",
                "--resume with its checkpoint_1.pth.tar", root=work,
                new_allowed=False)
    # resuming epoch 0 would write over checkpoint_1: refused unless --overwrite
    expect_exit(train.main, run_args("runs/a", "--num_epochs", "2", "--resume",
                                     os.path.join(ckpt_dir, "checkpoint_0.pth.tar")),
                capsys, "run_later", "holds checkpoint_1.pth.tar, of epochs after the resumed "
                "checkpoint_0.pth.tar", root=work, new_allowed=False)
    train.main(run_args("runs/a", "--num_epochs", "1", "--overwrite", "--seed", "5"))
    assert sorted(os.listdir(ckpt_dir)) == [outputs.MARKER, "checkpoint_0.pth.tar",
                                            "model_best.pth.tar"]
    assert load_checkpoint(os.path.join(ckpt_dir, runs.BEST))["opt"].seed == 5
    new_events = events("runs/a")
    assert len(new_events) == 1 and not set(new_events) & set(old_events)
    expect_exit(train.main, run_args("runs/a", "--num_epochs", "3"), capsys, "run_exists",
                "--resume with its checkpoint_0.pth.tar", root=work)


def test_new_model_name_with_an_old_logger_name_is_refused(work, shipped, capsys):
    """It used to mix two runs' TensorBoard curves in one directory."""
    train.main(run_args("runs/a", "--num_epochs", "1"))
    argv = run_args("runs/a", "--num_epochs", "1",
                    "--model_name", os.path.join("runs", "b", "checkpoint"))
    expect_exit(train.main, argv, capsys, "log_exists",
                "--logger_name %s: already holds the TensorBoard logs of the run in %s"
                % (os.path.join("runs", "a", "log"), os.path.join("runs", "a", "checkpoint")),
                "pass another --logger_name (one per run), or --overwrite", root=work,
                new_allowed=False)
    # resuming its own run continues its curves
    train.main(run_args("runs/a", "--num_epochs", "2", "--resume",
                        os.path.join("runs", "a", "checkpoint", "checkpoint_0.pth.tar")))
    assert len(events("runs/a")) == 2


def test_divergence_names_a_zero_norm_region_and_suggests_no_resume(tmp_path, capsys):
    """What `synthetic.py --img_dim 8` makes: a few all-zero region vectors. Training used to
    stop with "gradients are not finite ... check the features ..., then --resume from the
    last checkpoint_N" although `checks.py --features` found nothing and no checkpoint
    existed."""
    data_path, vocab_path = tiny_dataset(str(tmp_path), n_train=40, n_dev=10, n_test=10,
                                         img_dim=8)
    feats = os.path.join(data_path, "synth_precomp", "train_ims.npy")
    zero = ~(np.load(feats) != 0).any(-1)
    assert zero.any()
    run = str(tmp_path / "run")
    before = snapshot(tmp_path)
    line = expect_exit(train.main, train_args(data_path, vocab_path, run, "--img_dim", "8",
                                              "--seed", "0"),
                       capsys, "diverged_zero_region", "train_ims.npy: image ",
                       "has an all-zero region (region ", "), so at iteration ", "the gradients are not finite", "nothing was saved",
                       code=1)
    assert "--resume" not in line
    image, region = (int(line.split("image ")[1].split(" ")[0]),
                     int(line.split("(region ")[1].split(")")[0]))
    assert zero[image, region]
    assert_unchanged(before, tmp_path)
    assert not [f for f in os.listdir(os.path.join(run, "checkpoint"))]
    capsys.readouterr()
    assert checks.main(["--features", feats]) == 0
    out = capsys.readouterr().out
    assert "all finite" in out and "has an all-zero region" in out and \
        "the first of %d such images" % zero.any(1).sum() in out


@pytest.fixture
def diverge_in_epoch(monkeypatch):
    """Make the loss NaN from the first step of an epoch on (the data stays clean)."""
    state = {}
    real = model.SGRAF.train_loss

    def train_loss(self, *a, **k):
        loss, objective = real(self, *a, **k)
        if self.Eiters > state["after"]:
            objective = objective * float("nan")
            self.logger.update("Loss", float("nan"), 1)
        return loss, objective
    monkeypatch.setattr(model.SGRAF, "train_loss", train_loss)
    return state


def test_divergence_suggests_resume_only_with_a_checkpoint_of_the_run(work, shipped, capsys,
                                                                       diverge_in_epoch):
    ckpt_dir = os.path.join("runs", "a", "checkpoint")
    diverge_in_epoch["after"] = 10  # 20 images x 5 captions, batches of 10: epoch 1
    line = expect_exit(train.main, run_args("runs/a", "--num_epochs", "2"), capsys,
                       "diverged", "loss is nan at iteration 11", "so %s is kept"
                       % os.path.join(ckpt_dir, "checkpoint_0.pth.tar"),
                       "lower --learning_rate and pass --resume %s"
                       % os.path.join(ckpt_dir, "checkpoint_0.pth.tar"), code=1)
    # an --overwrite rerun that diverges before its first checkpoint: the earlier run's
    # checkpoint_0 is not its own, and no advice points at it
    diverge_in_epoch["after"] = 2
    line = expect_exit(train.main, run_args("runs/a", "--num_epochs", "2", "--overwrite"),
                       capsys, "diverged_start", "loss is nan at iteration 3, before the run's "
                       "first checkpoint", "lower --learning_rate and start again", root=work,
                       code=1)
    assert "--resume" not in line


def test_divergence_reads_the_images_from_the_file_not_the_padded_batch(
        work, shipped, capsys, monkeypatch):
    """A matcher's collate may pad images with zero regions (or drop some): the diagnosis of
    a diverged run looks at the batch's images as the features file holds them. Here the
    zeroed regions make the first step diverge, but the file holds none: no image of it is
    blamed."""
    import data

    def padded(items):
        batch = data.collate_fn(items)
        batch.images[:, -1] = 0  # as a collate that drops regions and pads with zeros
        return batch
    monkeypatch.setattr(model.SGRAF, "collate_fn", staticmethod(padded))
    line = expect_exit(train.main, run_args("runs/a", "--num_epochs", "1"), capsys,
                       "diverged_start", "at iteration 1, before the run's first checkpoint",
                       root=work, code=1)
    assert "all-zero" not in line and "--resume" not in line


# checks.py --convert-py2, np2h.py killed ----------------------------------------------

def test_convert_py2_creates_the_output_directory(work, shipped, capsys):
    """`checks.py --convert-py2 SRC missing_dir/out.pth.tar` used to be a traceback."""
    before = snapshot(work)
    assert checks.main(["--convert-py2", "ckpt/SGR.pth.tar", "missing_dir/out.pth.tar"]) == 0
    assert_unchanged(before, work)
    assert load_checkpoint("missing_dir/out.pth.tar")["opt"].module_name == "SGR"


def partial_files(directory):
    return [n for n in os.listdir(directory) if n.endswith(outputs.PARTIAL)]


def test_np2h_killed_midway_leaves_nothing_for_good(tmp_path, capsys):
    """A killed np2h.py used to leave a hidden partial .h5 (31 MB for COCO's dev split) that
    nothing ever removed: the next conversion there removes it."""
    x = np.random.default_rng(0).random((40, 36, 8), dtype=np.float32)
    np.save(tmp_path / "dev_ims.npy", x)
    killer = ("import os, signal, sys; sys.path.insert(0, %r); import np2h\n"
              "real = np2h.tqdm\n"
              "def dying(it, **k):\n"
              "    for i, v in enumerate(real(it, **k)):\n"
              "        if i == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
              "        yield v\n"
              "np2h.tqdm = dying\n"
              "np2h.main(['--data_path', %r, '--splits', 'dev', '--chunk', '4'])\n"
              % (REPO, str(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(partial_files(tmp_path)) == 1 and not (tmp_path / "dev.h5").exists()
    assert np2h.main(["--data_path", str(tmp_path), "--splits", "dev"]) == 0
    assert partial_files(tmp_path) == []
    import h5py
    with h5py.File(tmp_path / "dev.h5", "r") as f:
        assert np.array_equal(f["feat"][:], x)


def test_a_killed_save_is_cleaned_by_the_next_one(tmp_path):
    """The same for checkpoints (and every file written through outputs.atomic_output): a
    partial file of a process that is gone is removed; one of a live process is not."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket
    host = socket.gethostname()
    dead = tmp_path / (".checkpoint_3.pth.tar~%s~%s%s" % (host, gone, outputs.PARTIAL))
    live = tmp_path / (".checkpoint_4.pth.tar~%s~%d%s" % (host, os.getpid(), outputs.PARTIAL))
    other = tmp_path / ".notes~x~1.txt"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    outputs.atomic_save({"epoch": 1}, str(tmp_path / "checkpoint_0.pth.tar"))
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name,
                                                   "checkpoint_0.pth.tar"])


def killed_while_writing(code):
    """Run `code` in a process that SIGKILLs itself where it calls die()."""
    prelude = ("import os, signal, sys; sys.path.insert(0, %r)\n"
               "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n" % REPO)
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_killed_plot_is_cleaned_by_the_next_one(tmp_path):
    """plots.save writes through outputs.atomic_output too: a PNG half written by a killed
    process is removed by the next write there, which records its picture as its command's."""
    out = str(tmp_path / "attention.png")
    killed_while_writing(
        "import plots\nfrom matplotlib.figure import Figure\n"
        "def half(self, f, **k): f.write(b'\\x89PNG half'); f.flush(); die()\n"
        "Figure.savefig = half\n"
        "plots.save(Figure(), %r, 'retrieve.py --explain', '--explain')\n" % out)
    assert len(partial_files(tmp_path)) == 1 and not os.path.exists(out)
    import plots
    from matplotlib.figure import Figure
    plots.save(Figure(), out, "retrieve.py --explain", "--explain")
    assert partial_files(tmp_path) == []
    assert outputs.made_by(out) == "retrieve.py --explain"
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_killed_cache_entry_is_cleaned_by_the_next_one(tmp_path):
    """A retrieval cache entry (a directory) is written through outputs.atomic_output: the
    partial directory of a killed process is removed by the next write there, and the entry
    written then is complete and recorded as retrieve.py's."""
    entry = str(tmp_path / ("ab" * 20))
    make = ("import numpy as np, retrieve\n"
            "enc = retrieve.Encodings(np.ones((2, 3, 4), np.float32), np.ones((5, 4), np.float32),"
            " [2, 3], {}, ['a dog', 'a cat'], 1)\n")
    killed_while_writing(make + "np.savez = die\nenc.save(%r, {})\n" % entry)
    partial = partial_files(tmp_path)
    assert len(partial) == 1 and os.path.isdir(tmp_path / partial[0])
    assert not os.path.exists(entry)
    import retrieve
    enc = retrieve.Encodings(np.ones((2, 3, 4), np.float32), np.ones((5, 4), np.float32),
                             [2, 3], {}, ["a dog", "a cat"], 1)
    assert enc.save(entry, {}) and partial_files(tmp_path) == []
    assert outputs.made_by(entry) == "retrieve.py"
    back = retrieve.Encodings.load(entry)
    assert back.captions == ["a dog", "a cat"] and np.array_equal(back.img_embs, enc.img_embs)


# the shared helpers ----------------------------------------------------------------

def test_output_file_rule(tmp_path, shipped):
    """outputs.check_output_file: a missing file is written; an existing one is refused unless
    --overwrite or made by the same command (its record is returned), and only while it is
    as that command wrote it; a directory or a file in the way of its directory is refused."""
    path = str(tmp_path / "out" / "sims.npy")
    assert outputs.check_output_file(path, made_by="evaluation.py") is None
    with outputs.atomic_output(path) as tmp:
        np.save(open(tmp, "wb"), np.zeros(3))
    with pytest.raises(errors.UsageError) as e:
        outputs.check_output_file(path, made_by="evaluation.py")
    assert e.value.key == "file_exists" and "already exists;" in str(e.value)
    outputs.mark_made(path, "evaluation.py", rows=3)
    assert outputs.check_output_file(path, made_by="evaluation.py") == dict(
        outputs.made_record(path), rows=3)
    with pytest.raises(errors.UsageError) as e:
        outputs.check_output_file(path, made_by="retrieve.py", alternative="another --cache")
    assert "already exists (written by evaluation.py); pass --overwrite to replace it, or " \
           "another --cache" in str(e.value)
    assert outputs.check_output_file(path, made_by="retrieve.py", overwrite=True)
    with open(path, "ab") as f:  # the user changed it: no longer the command's
        f.write(b"x")
    assert outputs.made_record(path) is None
    with pytest.raises(errors.UsageError):
        outputs.check_output_file(path, made_by="evaluation.py")
    for bad, key in ((str(tmp_path / "out"), "path_not_file"),
                     (path + "/x.npy", "path_not_dir")):
        with pytest.raises(errors.UsageError) as e:
            outputs.check_output_file(bad)
        assert e.value.key == key
    outputs.mark_made(str(tmp_path / "out"), "demo.py")
    assert outputs.made_record(str(tmp_path / "out"))["made_by"] == "demo.py"
    assert outputs.made_record(path) is None  # the file's record is its own
    shipped_copy = tmp_path / "coco_precomp_vocab.json"
    shutil.copy(os.path.join(REPO, "vocab", "coco_precomp_vocab.json"), shipped_copy)
    with pytest.raises(errors.UsageError) as e:
        outputs.check_output_file(str(shipped_copy))
    assert e.value.key == "file_shipped"


# evaluation.py --save_sims over a file it did not make --------------------------------

def test_save_sims_never_writes_over_an_existing_file(work, shipped, capsys):
    with open("sims.npy", "wb") as f:
        f.write(b"the user's matrix")
    expect_exit(evaluation.main, split_args(E) + ["--save_sims", "sims.npy"], capsys,
                "output_not_ours", "sims.npy: exists and was not written by this tool",
                root=work, new_allowed=False)
