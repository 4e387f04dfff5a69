"""One run per directory, outputs checked before compute, OS failures and Ctrl-C as one line
(issue 27).

- The run lock: a second train.py into a --model_name that a running one holds is refused
  (`run_busy`), whether started together or later; the lock dies with its process even while
  its forked children (DataLoader workers) live; a run killed before its first checkpoint is
  started over by the same command.
- A read-only --model_name/--logger_name/--save_sims is refused before any compute, on a real
  read-only mount where this machine lets the test make one, else by an injected EROFS; a disk
  that cannot hold two checkpoints is refused before the first epoch; a disk that fills up while
  a checkpoint is written (a small tmpfs, or an injected ENOSPC) gives one line that names what
  was kept, and leaves no partial file; retrieve.py answers without its cache.
- Ctrl-C: train.py as a process (SIGINT while it trains), every other command by a
  KeyboardInterrupt raised where it computes: one line, what is saved and how to go on, exit 130.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import checks
import demo
import download
import errors
import evaluation
import np2h
import outputs
import retrieve
import runs
import synthetic
import train
import vocab
from checkpoint import load_checkpoint
from helpers import REPO, expect_exit, snapshot, assert_unchanged, tiny_dataset, train_args

# a subprocess that trains is given this long to reach the line a test waits for
DEADLINE = 120


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory):
    """Enough training pairs (200 steps of 10) that a run is still in its first epoch when a
    test acts on its first log line."""
    return tiny_dataset(str(tmp_path_factory.mktemp("runs_long")), n_train=400)


def start_train(args, cwd):
    return subprocess.Popen([sys.executable, "-u", os.path.join(REPO, "train.py")] + args,
                            cwd=str(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc, fragment):
    """Read proc's stderr until a line holds `fragment` (the lines read so far), or fail."""
    lines, deadline = [], time.time() + DEADLINE
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if fragment in line:
            return lines
    proc.kill()
    raise AssertionError("no %r line; stderr: %s" % (fragment, "".join(lines)[-2000:]))


def finish(proc):
    """(exit code, the rest of stderr)."""
    err = proc.stderr.read()
    proc.wait(DEADLINE)
    return proc.returncode, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- the run lock

def test_lock_dies_with_its_process_not_with_its_children(tmp_path):
    """A POSIX record lock is the process's own: a forked child alive after its parent's death
    (a DataLoader worker, orphaned by a SIGKILL) does not keep it (flock would)."""
    script = (
        "import os, sys, time; sys.path.insert(0, %r); import outputs\n"
        "lock = outputs.lock_dir(%r, 'here', '--model_name')\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.close(w); os.read(r, 1); os._exit(0)  # a child that outlives its parent\n"
        "print('locked', flush=True); sys.stdin.readline(); os._exit(0)\n"
        % (REPO, str(tmp_path / "run")))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(errors.UsageError) as e:  # held: another process's
        outputs.lock_dir(str(tmp_path / "run"), "--model_name run", "--model_name")
    assert e.value.key == "run_busy" and "pid %d" % proc.pid in str(e.value)
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(DEADLINE)
    # the parent is gone, its forked child still waits on the pipe: the lock is free
    lock = outputs.lock_dir(str(tmp_path / "run"), "--model_name run", "--model_name")
    lock.release()
    assert os.listdir(tmp_path / "run") == []  # the lock file goes with the run


def test_two_runs_into_one_directory(long_dataset, tmp_path, capsys):
    """Two trainings started together into one --model_name (with DataLoader workers): exactly
    one runs, the other is refused with one line; a third started later is refused too; a
    Ctrl-C stops the one that runs with one line; the directory holds one run's files."""
    data_path, vocab_path = long_dataset
    run = tmp_path / "run"

    def args(seed):
        return train_args(data_path, vocab_path, str(run), "--num_epochs", "1000",
                          "--seed", str(seed), "--workers", "1", "--log_step", "1",
                          "--val_step", "100000")
    a, b = start_train(args(1), tmp_path), start_train(args(2), tmp_path)
    # the one refused exits; the other trains until it is stopped
    deadline = time.time() + DEADLINE
    while a.poll() is None and b.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    code, err = finish(loser)
    assert code == 2 and "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1 and "another train.py (pid %d) is running" % winner.pid in lines[0]
    # a later one, once the winner trains (workers alive)
    wait_for(winner, "Epoch: [")
    expect_exit(train.main, args(3), capsys, "run_busy", "pid %d" % winner.pid)
    # Ctrl-C while it trains: one line, exit 130
    winner.send_signal(signal.SIGINT)
    code, err = finish(winner)
    assert code == 130 and "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: train.py: interrupted (Ctrl-C); ")
    ckpts = runs.run_checkpoints(str(run / "checkpoint"))
    if ckpts:
        assert "--resume %s" % ckpts[-1][1] in lines[0]
    else:
        assert "no checkpoint was saved yet; run the same command again" in lines[0]
    # one run's files: its checkpoints (all of the winner's seed), one TensorBoard log
    seed = 1 if winner is a else 2
    assert all(load_checkpoint(p)["opt"].seed == seed for _, p in ckpts)
    assert len([n for n in os.listdir(run / "log") if n.startswith(runs.TB_EVENTS)]) == 1
    assert not os.path.exists(run / "checkpoint" / outputs.LOCK)  # released


def test_rerun_after_a_kill_before_the_first_checkpoint(long_dataset, tmp_path):
    """SIGKILL while the first epoch trains (DataLoader workers orphaned, still alive for a
    while): the same command at once is the same run, started over, not `log_exists` nor
    `run_busy`."""
    data_path, vocab_path = long_dataset
    run = tmp_path / "run"
    args = train_args(data_path, vocab_path, str(run), "--num_epochs", "1", "--seed", "1",
                      "--workers", "2", "--log_step", "1")
    proc = start_train(args, tmp_path)
    wait_for(proc, "Epoch: [0][0/")
    proc.send_signal(signal.SIGKILL)
    proc.wait(DEADLINE)
    assert runs.run_checkpoints(str(run / "checkpoint")) == []  # killed before the first
    old = [n for n in os.listdir(run / "log") if n.startswith(runs.TB_EVENTS)]
    assert len(old) == 1
    # the same command: it starts (no refusal), and a Ctrl-C stops it with one line
    rerun = start_train(args, tmp_path)
    wait_for(rerun, "Epoch: [0][0/")
    rerun.send_signal(signal.SIGINT)
    code, err = finish(rerun)
    assert code == 130 and "Traceback" not in err, err
    assert error_lines(err) == ["error: train.py: interrupted (Ctrl-C); no checkpoint was saved "
                                "yet; run the same command again (it starts over)"]


# ----------------------------------------------------------------------------- before compute

def read_only_mount(path):
    """Make `path` a read-only tmpfs (root can write through chmod, not through a read-only
    mount); skip when this machine does not let the test mount one."""
    os.makedirs(path, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (%s)" % out.stderr.strip())


def umount(path):
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("flag", ["--model_name", "--logger_name"])
def test_read_only_run_directory_is_refused_before_compute(dataset, tmp_path, capsys,
                                                          monkeypatch, flag):
    data_path, vocab_path = dataset
    ro = tmp_path / "ro"
    read_only_mount(ro)
    try:
        args = train_args(data_path, vocab_path, str(tmp_path / "run"), "--num_epochs", "1")
        args[args.index(flag) + 1] = str(ro / "sub")
        # nothing is computed: the refusal comes before the data are loaded
        monkeypatch.setattr(train, "prepare_data", lambda *a: pytest.fail("computed"))
        expect_exit(train.main, args, capsys, "output_unwritable", "read-only file system",
                    root=tmp_path / "run", new_allowed=False)
    finally:
        umount(ro)
    assert not os.path.exists(tmp_path / "run")  # the other directory was not left made


def test_read_only_save_sims_is_refused_before_compute(dataset, trained, tmp_path, capsys,
                                                       monkeypatch):
    data_path, vocab_path = dataset
    best = trained
    # EROFS as os.access reports it for a read-only mount
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(
        str(tmp_path / "out")) else real(p, m, **k))
    monkeypatch.setattr(evaluation, "score", lambda *a, **k: pytest.fail("computed"))
    os.makedirs(tmp_path / "out")
    expect_exit(evaluation.main, ["--model_path", best, "--data_path", data_path,
                                  "--vocab_path", vocab_path, "--split", "test",
                                  "--save_sims", str(tmp_path / "out" / "s.npy")],
                capsys, "output_unwritable", "not writable", root=tmp_path / "out",
                new_allowed=False)


def test_disk_too_small_for_two_checkpoints(dataset, trained, tmp_path, capsys, monkeypatch):
    """Refused before the first epoch, with the sizes: fresh, and resumed (which the original
    would meet as `RuntimeError: [enforce fail at inline_container.cc]` at its first save)."""
    data_path, vocab_path = dataset
    run = os.path.dirname(os.path.dirname(trained))
    ck0 = os.path.join(run, "checkpoint", "checkpoint_0.pth.tar")
    before = snapshot(run)
    size = os.path.getsize(ck0)
    real = outputs.shutil.disk_usage

    def full(path):  # the disk holds one more checkpoint, not two
        return real(path)._replace(free=size)
    monkeypatch.setattr(outputs.shutil, "disk_usage", full)
    monkeypatch.setattr(train, "train_loop", lambda *a: pytest.fail("computed"))
    line = expect_exit(train.main, train_args(data_path, vocab_path, run, "--num_epochs", "2",
                                              "--resume", ck0),
                       capsys, "disk_space", "two checkpoints of")
    assert_unchanged(before, run, new_allowed=False)
    assert " are needed (two checkpoints of " in line and " are free; " in line
    expect_exit(train.main, train_args(data_path, vocab_path, str(tmp_path / "new"),
                                       "--num_epochs", "1"),
                capsys, "disk_space", "--model_name", root=tmp_path)


def _small_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "tmpfs", str(path)],
                         capture_output=True, text=True)
    return out.returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_while_saving_a_checkpoint(dataset, trained, tmp_path, capsys, monkeypatch,
                                             how):
    """The disk fills up while model_best.pth.tar of epoch 2 is written (checkpoint_1 is on
    disk): one line naming the file, what was kept and how to go on; the earlier
    model_best.pth.tar is intact and no partial file is left."""
    data_path, vocab_path = dataset
    run = tmp_path / "run"
    if how == "tmpfs" and not _small_tmpfs(run, 64 << 20):
        pytest.skip("cannot mount a tmpfs here")
    try:
        # a copy of a run of one epoch (its own TensorBoard logs stay with the original)
        shutil.copytree(os.path.dirname(trained), run / "checkpoint", dirs_exist_ok=True)
        best = run / "checkpoint" / runs.BEST
        before = best.read_bytes()
        ck0 = str(run / "checkpoint" / "checkpoint_0.pth.tar")
        # the next save of model_best fails as a full disk fails it
        monkeypatch.setattr(train, "validate_on_master", lambda *a: 1000.0)  # always the best
        if how == "tmpfs":  # fill the disk once checkpoint_1 is written
            real_save = outputs.atomic_save

            def save_then_fill(obj, path, *a, **k):
                real_save(obj, path, *a, **k)
                with open(run / "filler", "wb") as f:
                    with pytest.raises(OSError):
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
            monkeypatch.setattr(outputs, "atomic_save", save_then_fill)
        else:
            def no_space(src, dst):
                with open(dst, "wb") as f:
                    f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(outputs.shutil, "copyfile", no_space)
        line = expect_exit(train.main, train_args(data_path, vocab_path, str(run),
                                                  "--num_epochs", "2", "--seed", "1",
                                                  "--resume", ck0, "--logger_name",
                                                  str(tmp_path / "log")),
                           capsys, "write_failed", "model_best.pth.tar: could not be written "
                           "(no space left on device); checkpoint_1.pth.tar is intact and the "
                           "earlier model_best.pth.tar is intact; free some space, then "
                           "continue with --resume ")
        assert line.endswith("checkpoint_1.pth.tar")
        assert best.read_bytes() == before  # the earlier best, whole
        assert not [n for n in os.listdir(run / "checkpoint") if n.endswith(outputs.PARTIAL)]
        load_checkpoint(str(run / "checkpoint" / "checkpoint_1.pth.tar"))  # whole
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(run)], capture_output=True)



def test_atomic_output_failure_leaves_nothing(tmp_path):
    """EROFS/EACCES/ENOSPC in any writer: one line, the partial removed, the earlier file
    kept."""
    path = tmp_path / "out.json"
    path.write_text("earlier")
    for code, reason in [(errno.ENOSPC, "no space left on device"),
                         (errno.EROFS, "read-only file system"),
                         (errno.EACCES, "permission denied")]:
        with pytest.raises(errors.DataError) as e:
            with outputs.atomic_output(str(path), "test") as tmp:
                with open(tmp, "w") as f:
                    f.write("half")
                raise OSError(code, os.strerror(code))
        assert e.value.key == "write_failed"
        assert str(e.value).startswith("%s: could not be written (%s); the earlier out.json "
                                       "is intact; " % (path, reason))
        assert sorted(os.listdir(tmp_path)) == ["out.json"] and path.read_text() == "earlier"


def test_retrieve_answers_without_a_cache_it_cannot_write(dataset, trained, tmp_path, capsys,
                                                          caplog, monkeypatch):
    data_path, vocab_path = dataset
    best = trained
    argv = ["--model_path", best, "--data_path", data_path, "--vocab_path", vocab_path,
            "--split", "test", "--query", "a dog", "--json"]
    uncached = retrieve.retrieve(best, query="a dog", topk=5, data_path=data_path,
                                 vocab_path=vocab_path, split="test", cache_dir=None)
    # a full disk while the entry is written
    cache = tmp_path / "cache"

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(retrieve.np, "savez", no_space)
    capsys.readouterr()
    hits = retrieve.retrieve(best, query="a dog", topk=5, data_path=data_path,
                             vocab_path=vocab_path, split="test", cache_dir=str(cache))
    assert hits["results"] == uncached["results"] and not hits["cached"]
    assert any("the retrieval cache cannot be kept there (no space left on device)" in
               r.getMessage() for r in caplog.records)
    assert not [n for n in os.listdir(cache) if n.endswith(outputs.PARTIAL)]
    # a read-only cache directory: the command answers, exit 0, one warning
    monkeypatch.undo()
    read_only_mount(tmp_path / "ro")
    try:
        caplog.clear()
        retrieve.main(argv + ["--cache_dir", str(tmp_path / "ro" / "cache")])
    finally:
        umount(tmp_path / "ro")
    assert '"text": "a dog"' in capsys.readouterr().out
    assert any("cannot be kept there" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- Ctrl-C

def interrupt(*a, **k):
    raise KeyboardInterrupt


def expect_interrupt(main, argv, capsys, name, *fragments):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 130
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    lines = error_lines(out.err)
    assert len(lines) == 1 and lines[0].startswith(
        "error: %s: interrupted (Ctrl-C); " % name), out.err
    assert len(lines[0]) <= errors.MAX_LINE
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    data_path, vocab_path = dataset
    run = str(tmp_path_factory.mktemp("trained"))
    train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1", "--seed", "1"))
    return os.path.join(run, "checkpoint", runs.BEST)


def test_ctrl_c_in_evaluation(dataset, trained, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = dataset
    argv = ["--model_path", trained, "--data_path", data_path, "--vocab_path", vocab_path,
            "--split", "test"]
    monkeypatch.setattr(evaluation, "score", interrupt)
    expect_interrupt(evaluation.main, argv, capsys, "evaluation.py",
                     "nothing was written; run the same command again")
    sims = str(tmp_path / "s.npy")
    expect_interrupt(evaluation.main, argv + ["--save_sims", sims], capsys, "evaluation.py",
                     "the shards of %s scored so far are saved; run the same command again: "
                     "it continues from them" % sims)
    monkeypatch.undo()
    evaluation.main(argv + ["--save_sims", sims])  # it does


def test_ctrl_c_in_retrieve_writes_no_cache_entry(dataset, trained, tmp_path, capsys,
                                                  monkeypatch):
    data_path, vocab_path = dataset
    cache = tmp_path / "cache"
    real = retrieve.np.savez

    def savez_then_interrupt(*a, **k):  # while the entry is written
        real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(retrieve.np, "savez", savez_then_interrupt)
    expect_interrupt(retrieve.main, ["--model_path", trained, "--data_path", data_path,
                                     "--vocab_path", vocab_path, "--split", "test", "--query",
                                     "a dog", "--cache_dir", str(cache)],
                     capsys, "retrieve.py", "nothing was written")
    assert [n for n in os.listdir(cache) if os.path.isdir(cache / n)] == []  # no entry/partial


def test_ctrl_c_in_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "evalrank", interrupt)  # its first compute
    expect_interrupt(demo.main, ["--n_train", "40", "--data_path", str(tmp_path / "data"),
                                 "--vocab_path", str(tmp_path / "vocab"), "--run_dir",
                                 str(tmp_path / "demo"), "--num_epochs", "1"],
                     capsys, "demo.py", "the demo's run in %s is incomplete" % (
                         tmp_path / "demo"), "run the same command again with --overwrite")


@pytest.mark.parametrize("name", ["np2h", "vocab", "synthetic", "checks", "bench", "download"])
def test_ctrl_c_in_the_other_commands(name, dataset, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = dataset
    split_dir = os.path.join(data_path, "synth_precomp")
    before = snapshot(tmp_path)
    main, argv, patch, fragment = {
        "np2h": (np2h.main, ["--data_path", split_dir, "--splits", "test"], (np2h, "_write"),
                 "nothing was written"),
        "vocab": (vocab.vocab_command, ["--data_path", data_path, "--data_name",
                                        "synth_precomp", "--vocab_path", str(tmp_path / "v")],
                  (vocab, "build_vocab"), "nothing was written"),
        "synthetic": (synthetic.main, ["--data_path", str(tmp_path / "d"), "--vocab_path",
                                       str(tmp_path / "v")], (synthetic, "make_synthetic"),
                      "nothing was written"),
        "checks": (checks.main, ["--features", os.path.join(split_dir, "test_ims.npy")],
                   (checks.data, "open_features"), "nothing was written"),
        "bench": (bench.main, ["--threads", "1"], (bench, "matmul_peak"),
                  "nothing was written"),
        "download": (download.main, ["scan-vocab", "--vocab_path", str(tmp_path / "v")],
                     (download, "get"), "what was fetched so far is kept"),
    }[name]
    monkeypatch.setattr(*patch, interrupt)
    threads = torch.get_num_threads()
    try:
        expect_interrupt(main, argv, capsys, "%s.py" % name, fragment)
    finally:
        torch.set_num_threads(threads)
    assert_unchanged(before, tmp_path, new_allowed=False)


def test_ctrl_c_in_a_command_run_by_another(capsys):
    """demo.py runs train.py's main in its own: the outer command's line, once."""
    @errors.exit_on_error
    def inner(argv=None):
        errors.on_interrupt("inner's checkpoint is saved", "continue the inner way")
        raise KeyboardInterrupt

    @errors.exit_on_error
    def outer(argv=None):
        errors.on_interrupt("outer's run is incomplete", "run outer again")
        inner()
    handler = signal.getsignal(signal.SIGINT)
    expect_interrupt(outer, [], capsys, "test_runs.py",
                     "interrupted (Ctrl-C); outer's run is incomplete; run outer again")
    assert signal.getsignal(signal.SIGINT) is handler  # given back to the caller


def test_argument_errors_name_their_command(capsys):
    expect_exit(demo.main, ["--bogus"], capsys, "arguments",
                "demo.py: unrecognized arguments: --bogus", "python demo.py --help")


def test_the_resource_sharers_broken_connections_are_not_shown(tmp_path):
    """A Ctrl-C may stop a DataLoader worker while multiprocessing's resource sharer (a thread
    of the main process) talks to it; the sharer reports the broken connection through
    sys.excepthook (multiprocessing.resource_sharer._serve): no bug to show, whenever it comes
    (the hook is in place from the start of every command). Other errors still show."""
    import importlib.util
    (tmp_path / "resource_sharer.py").write_text("def serve():\n    raise BrokenPipeError\n")
    spec = importlib.util.spec_from_file_location("resource_sharer",
                                                  tmp_path / "resource_sharer.py")
    sharer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sharer)

    def other():
        raise EOFError("not the resource sharer's")
    before, seen = sys.excepthook, []
    try:
        errors.exit_on_error(lambda argv=None: 0)()  # any command puts the hook in place
        assert getattr(sys.excepthook, "quiet_resource_sharer", False)
    finally:
        sys.excepthook = before
    hook = errors._quiet_resource_sharer(lambda *exc: seen.append(exc[1]))
    for raising in (sharer.serve, other):
        try:
            raising()
        except Exception:
            hook(*sys.exc_info())
    assert [str(e) for e in seen] == ["not the resource sharer's"]
