"""What the tests share, written once: a tiny synthetic dataset and tiny model flags; the
reference fixtures (their folders, their checkpoints loaded strictly, the parameters in the
originals' order); evaluation.py run as a command or in-process and its result lines; the
checks of a refused command (its exit code, its one `error:` line, no file changed)."""
import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import errors
import evaluation
from checkpoint import load_checkpoint
from synthetic import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_DIMS = ["--img_dim", "32", "--embed_size", "16", "--word_dim", "8"]
# the tiny dims of a matcher's own flags (a flag of another matcher is refused)
TINY_OWN = {"SGR": ["--sim_dim", "8"], "SAF": ["--sim_dim", "8"]}


def tiny_dims(module="SGR"):
    return TINY_DIMS + TINY_OWN.get(module, [])


def tiny_dataset(root, n_train=40, n_dev=10, n_test=10, img_dim=32, seed=0, **kw):
    """A SCAN-format synthetic dataset under root/data, its vocab under root/vocab."""
    data_path, vocab_path = os.path.join(root, "data"), os.path.join(root, "vocab")
    make_synthetic(data_path, "synth_precomp", vocab_path, seed=seed, n_train=n_train,
                   n_dev=n_dev, n_test=n_test, img_dim=img_dim, **kw)
    return data_path, vocab_path


def train_args(data_path, vocab_path, run_dir, *extra):
    module = extra[extra.index("--module_name") + 1] if "--module_name" in extra else "SGR"
    return (["--data_path", data_path, "--data_name", "synth_precomp", "--vocab_path",
             vocab_path, "--model_name", os.path.join(run_dir, "checkpoint"),
             "--logger_name", os.path.join(run_dir, "log"), "--workers", "0",
             "--batch_size", "10", "--log_step", "2", "--device", "cpu"] + tiny_dims(module) +
            list(extra))


def snapshot(root):
    """{path: sha256} of every file under `root`, and every directory (value None)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else None for p in sorted(Path(root).rglob("*"))}


def assert_unchanged(before, root, new_allowed=True):
    """Every file of the `before` snapshot is byte for byte the same; with
    `new_allowed=False`, nothing was added either."""
    after = snapshot(root)
    changed = [name for name, digest in before.items() if after.get(name, 0) != digest]
    assert not changed, "files changed or removed: %s" % changed
    if not new_allowed:
        added = sorted(set(after) - set(before))
        assert not added, "files written: %s" % added


# an error line is read at a glance (issue 16; tests/test_error_lines.py)
ERROR_LINE_LIMIT = 300


def expect_exit(main, argv, capsys, key, *fragments, root=None, code=2, new_allowed=True):
    """`main(argv)` exits with `code`, prints one `error: ...` line holding the fragments,
    raised as the problem `key`; no file under `root` changed (nor was added, with
    `new_allowed=False`). Returns the line."""
    before = snapshot(root) if root else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = exc.value.__context__
    assert isinstance(err, errors.PROBLEMS[key].cls) and err.key == key, err
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0] == "error: %s" % err, out.err
    assert "Traceback" not in out.err + out.out
    assert len(lines[0]) <= ERROR_LINE_LIMIT, (len(lines[0]), lines[0])
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if root:
        assert_unchanged(before, root, new_allowed)
    return lines[0]


# ----------------------------------------------------------------------------- fixtures

def fixture_dir(fixtures, family, name):
    """The folder of one reference fixture, e.g. fixtures/gsmn_ref/<name>."""
    return fixtures / family / name


def load_fixture(fixtures, family, name, cls, opt_cls=argparse.Namespace):
    """A fixture's model_best.pth.tar loaded strictly into `cls` (its flags as `opt_cls`), on
    the CPU: (model, opt, checkpoint)."""
    ckpt = load_checkpoint(str(fixture_dir(fixtures, family, name) / "model_best.pth.tar"))
    opt = opt_cls(**vars(ckpt["opt"]))
    opt.device = "cpu"
    model = cls(opt)
    model.load_state_dict(ckpt["model"])  # strict
    return model, opt, ckpt


def named_params(model, parts, rename=None):
    """[(name, parameter)] of the model's `parts` (its submodules, in that order, as the
    original's `model.params`), each name `part.name` as `rename` gives the original's."""
    return [((rename or str)(part + "." + k), v) for part in parts
            for k, v in getattr(model, part).named_parameters()]


def assert_loads_as_recorded(model, ckpt, train_step, parts, rename=None):
    """The model's state dicts are the checkpoint's, key for key, and its optimiser's parameters
    are the original's, in its order (Adam's state follows that order)."""
    for ours, ref in zip(model.state_dict(), ckpt["model"], strict=True):
        assert list(ours.keys()) == list(ref.keys())
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
    by_id = {id(p): n for n, p in named_params(model, parts, rename)}
    assert [by_id[id(p)] for p in model.params] == list(train_step["param_names"])


def assert_ranks_as_recorded(sims, exp):
    """The original's R@K, rsum, ranks and top-1 of the recorded similarity matrix `exp`."""
    r, (ranks, top1) = evaluation.i2t(None, None, None, sims, return_ranks=True)
    ri, (ranks_i, top1_i) = evaluation.t2i(None, None, None, sims, return_ranks=True)
    assert list(r) == list(exp["i2t"]) and list(ri) == list(exp["t2i"])
    assert sum(r[:3]) + sum(ri[:3]) == float(exp["rsum"])
    np.testing.assert_array_equal(ranks, exp["i2t_ranks"])
    np.testing.assert_array_equal(ranks_i, exp["t2i_ranks"])
    for key, got in (("i2t_top1", top1), ("t2i_top1", top1_i)):
        if key in exp:
            np.testing.assert_array_equal(got, exp[key])


# ----------------------------------------------------------------------------- evaluation.py

def run_eval(*args, code=0):
    """evaluation.py as a command: a subprocess (its own imports, its exit code)."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "evaluation.py")] + list(args),
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == code, out.stderr
    return out


def eval_main(capsys, *args, code=0):
    """evaluation.main in this process (faster): (stdout, stderr)."""
    capsys.readouterr()
    try:
        evaluation.main(list(args))
        rc = 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == code, err
    return out, err


def result_lines(stdout, only=None):
    """The result lines evaluation prints, from `rsum:` on (R@K, means, ASP; with --fold5
    every fold's lines first); with `only`, those starting with one of these prefixes."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(("rsum: ", "Image to text: ")))
    return [line for line in lines[start:] if only is None or line.startswith(only)]


def save_model_of_flags(path, data_path, vocab_path, run_dir, flags):
    """A checkpoint (ours, epoch 1) of the untrained model that train.py's `flags` build on the
    dataset, on the CPU; returns its path."""
    import matchers
    import opts
    opt = opts.parse_opt(train_args(data_path, vocab_path, run_dir, *flags))
    opt.device, opt.workers = "cpu", 0
    opt.vocab_size = len(matchers.matcher_class(opt.module_name).vocabulary(opt)[0])
    model = matchers.build_model(opt)
    torch.save({"epoch": 1, "model": model.state_dict(), "best_rsum": 0.0, "opt": opt,
                "Eiters": 1}, path)
    return path
