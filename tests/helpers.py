"""Small builders shared by the tests: a tiny synthetic dataset and tiny model flags; the
checks of a refused command (its exit code, its one `error:` line, no file changed)."""
import hashlib
import os
from pathlib import Path

import pytest

import errors

from synthetic import make_synthetic

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
