"""Evaluation at scale (issue 16): the scoring shared by torchrun processes, --save_sims written
as it is scored and continued after a kill, and refused over a file it did not make.

- `torchrun --nproc_per_node 2 evaluation.py --device cpu` prints the result lines of one
  process and writes the same matrix (within 1e-7; bit for bit here), for SGR and NAAF, and for
  --fold5 (on 5 folds of 8 images: a COCO-sized split, 25M pairs, is too slow for the suite);
  rank 0 alone prints and writes.
- A torchrun evaluation killed (SIGKILL) after some shards are recorded, then run again, ends
  with the matrix of an uninterrupted run, scoring only the shards the record lacks.
- A rerun with another checkpoint or split, a file the tool did not make, a directory that
  does not exist: one-line errors (exit code 2), the file and its record byte for byte
  unchanged; --overwrite starts afresh.
"""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluation
import matrix
import naaf
import outputs
from helpers import result_lines, tiny_dataset
from model import SGRAF
from vocab import deserialize_vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TEST = 40  # 40 images x 200 captions: 4 x 4 shards; 5 folds of 8 images for --fold5

# evaluation.py's main, with folds of 8 images (for --fold5 on the 40-image split) and each
# shard slowed down by $SLOW_SHARD seconds (so that a kill lands mid-evaluation); each process
# writes its pid to $PID_DIR
PROBE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import evaluation
import matrix
matrix.FOLD_IMAGES = 8
delay = float(os.environ.get("SLOW_SHARD", "0"))
if delay:
    score_shard = matrix.score_shard
    def slow(*args):
        time.sleep(delay)
        return score_shard(*args)
    matrix.score_shard = slow
if os.environ.get("PID_DIR"):
    with open(os.path.join(os.environ["PID_DIR"], "pid%s" % os.environ.get("RANK", "")), "w") as f:
        f.write(str(os.getpid()))
sys.exit(evaluation.main(sys.argv[2:]))
"""


def sgr_opt(n_vocab):
    return argparse.Namespace(
        data_path="/x", data_name="synth_precomp", vocab_path="/x/vocab", model_name="/x/c",
        logger_name="/x/l", batch_size=128, num_epochs=40, lr_update=30, learning_rate=0.0002,
        workers=0, log_step=10, val_step=1000, grad_clip=2.0, margin=0.2, max_violation=True,
        img_dim=32, word_dim=8, embed_size=16, sim_dim=8, num_layers=1, bi_gru=True,
        no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=3, vocab_size=n_vocab)


def naaf_opt(n_vocab):
    return argparse.Namespace(
        data_path="/x", data_name="synth_precomp", vocab_path="/x/vocab", margin=0.2,
        num_epochs=20, batch_size=128, word_dim=8, embed_size=16, grad_clip=2.0, num_layers=1,
        learning_rate=0.0005, lr_update=10, workers=0, log_step=200, val_step=10,
        logger_name="./l", logg_path="./g", model_name="./c", resume="", precomp_enc_type="basic",
        precomp_enc_text_type="basic", img_dim=32, no_imgnorm=False, no_txtnorm=False,
        lambda_softmax=20.0, mean_neg=0.33, stnd_neg=0.07, mean_pos=0.59, stnd_pos=0.1,
        thres=0.47, thres_safe=0.3, alpha=2.0, using_intra_info=True, vocab_size=n_vocab)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    data_path, vocab_path = tiny_dataset(str(root), n_train=5, n_dev=8, n_test=N_TEST)
    n_vocab = len(deserialize_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    paths = {}
    for seed, (name, cls, make) in enumerate([("SGR", SGRAF, sgr_opt), ("SGR2", SGRAF, sgr_opt),
                                              ("NAAF", naaf.NAAF, naaf_opt)]):
        torch.manual_seed(seed)
        opt = make(n_vocab)
        model = cls(argparse.Namespace(**vars(opt), device="cpu"))
        paths[name] = str(root / ("%s.pth.tar" % name))
        torch.save({"epoch": 3, "model": model.state_dict(), "best_rsum": 1.0, "opt": opt,
                    "Eiters": 9}, paths[name])
    probe = root / "probe.py"
    probe.write_text(PROBE)
    return {"data": data_path, "vocab": vocab_path, "paths": paths, "probe": str(probe),
            "root": root}


def eval_args(setup, name, *extra, split="test"):
    return ["--model_path", setup["paths"][name], "--data_path", setup["data"], "--vocab_path",
            setup["vocab"], "--split", split, "--device", "cpu"] + list(extra)


def child_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def command(setup, args, nproc=1):
    """evaluation.py (through the probe) in one process, or under torchrun."""
    if nproc == 1:
        return [sys.executable, setup["probe"], REPO] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=%d" % nproc, setup["probe"], REPO] + args


def run(setup, args, nproc=1, code=0, **env):
    out = subprocess.run(command(setup, args, nproc), capture_output=True, text=True,
                         env=child_env(**env), cwd=str(setup["root"]), timeout=600)
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def done_shards(record):
    header, entries = outputs.read_record(record)
    return header, [k for e in entries for k in e.get("done", [])]


@pytest.mark.parametrize("name,fold5", [("SGR", False), ("NAAF", False), ("SGR", True)])
def test_torchrun_two_processes_equal_one(setup, tmp_path, monkeypatch, name, fold5):
    monkeypatch.setattr(matrix, "FOLD_IMAGES", 8)  # as the probe
    flags = ["--fold5"] if fold5 else []
    one, two = str(tmp_path / "one.npy"), str(tmp_path / "two.npy")
    out1 = run(setup, eval_args(setup, name, "--save_sims", one, *flags)).stdout
    out2 = run(setup, eval_args(setup, name, "--save_sims", two, *flags), nproc=2).stdout
    assert result_lines(out1) == result_lines(out2)
    assert out2.count("rsum: ") == out1.count("rsum: ")  # rank 0 alone prints
    a, b = np.load(one), np.load(two)
    assert a.shape == b.shape == (N_TEST, 5 * N_TEST)
    if fold5:  # only the folds are scored; the printed folds are those of the matrix
        n = 8
        for k in range(5):
            block = a[k * n:(k + 1) * n, 5 * k * n:5 * (k + 1) * n]
            assert np.isfinite(block).all()
            assert "Image to text: %.1f, %.1f, %.1f, %.1f, %.1f" % evaluation.i2t(
                None, None, None, block) in out1
        assert np.isnan(a).sum() == a.size - 5 * n * 5 * n
        assert np.array_equal(np.isnan(a), np.isnan(b))
    else:
        assert np.isfinite(a).all()
    assert np.nanmax(np.abs(a - b)) <= 1e-7
    # both records list every shard once; the two processes' record says the same
    shards = matrix.shard_grid(matrix.score_regions(N_TEST, 5 * N_TEST, fold5))
    assert len(shards) == (5 if fold5 else 16)
    for f in (one, two):
        header, done = done_shards(f + ".record")
        assert sorted(done) == list(range(len(shards)))
    assert done_shards(one + ".record")[0]["identity"] == done_shards(two + ".record")[0]["identity"]
    if name == "SGR" and not fold5:  # again, every shard scored: rank 0 reprints, none fails
        again = run(setup, eval_args(setup, name, "--save_sims", two), nproc=2).stdout
        assert "every shard already scored" in again
        assert result_lines(again) == result_lines(out1)


def wait_for(predicate, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_sigkill_then_rerun_gives_the_uninterrupted_matrix(setup, tmp_path, capsys):
    ref = str(tmp_path / "ref.npy")
    ref_lines = result_lines(run(setup, eval_args(setup, "SGR", "--save_sims", ref)).stdout)
    f = str(tmp_path / "sims.npy")
    args = eval_args(setup, "SGR", "--save_sims", f)
    pids = tmp_path / "pids"
    pids.mkdir()
    # torchrun, 2 processes, 0.5 s per shard: killed after 2 rounds (4 of 16 shards) are on disk
    proc = subprocess.Popen(command(setup, args, nproc=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=child_env(SLOW_SHARD="0.5", PID_DIR=str(pids)),
                            cwd=str(setup["root"]))
    try:
        assert wait_for(lambda: os.path.exists(f + ".record") and
                        len(done_shards(f + ".record")[1]) >= 4), "no shard recorded"
        for p in pids.iterdir():  # the workers (torchrun starts them in their own sessions)
            os.kill(int(p.read_text()), signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    _, before = done_shards(f + ".record")
    assert 4 <= len(before) < 16
    partial = np.load(f)
    assert np.isnan(partial).any()  # unfinished
    # the same command again: continues, scores only the rest, ends with the reference matrix
    out = run(setup, args, nproc=2).stdout
    _, after = done_shards(f + ".record")
    assert sorted(after) == list(range(16)) and after[:len(before)] == before
    assert np.array_equal(np.load(f), np.load(ref))
    assert result_lines(out) == ref_lines
    # once more: nothing left to score, the same lines from the file
    capsys.readouterr()
    evaluation.main(args)
    again = capsys.readouterr().out
    assert "every shard already scored" in again and result_lines(again) == ref_lines


def test_a_crash_between_shards_continues_in_one_process(setup, tmp_path, capsys):
    """In-process: a record that lost its last shards (as after a kill) is continued."""
    f = str(tmp_path / "s.npy")
    args = eval_args(setup, "SGR", "--save_sims", f)
    evaluation.main(args)
    full = np.load(f)
    rec = f + ".record"
    lines = open(rec).read().splitlines(keepends=True)
    kept = lines[:-5] + ['{"done":[']  # 5 shards unrecorded, a line cut short by the crash
    with open(rec, "w") as fh:
        fh.write("".join(kept))
    sims = np.load(f, mmap_mode="r+")
    sims[:] = np.nan  # whatever a shard held, only the recorded shards are trusted...
    header, done = done_shards(rec)
    for k, (i0, i1, j0, j1) in enumerate(matrix.shard_grid([(0, N_TEST, 0, 5 * N_TEST)])):
        if k in done:
            sims[i0:i1, j0:j1] = full[i0:i1, j0:j1]  # ...and those are on disk
    sims.flush()
    del sims
    capsys.readouterr()
    evaluation.main(args)
    assert np.array_equal(np.load(f), full)
    assert sorted(done_shards(rec)[1]) == list(range(16))


def snapshot(*paths):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths
            if os.path.exists(p)}


def refused(setup, args, capsys, key, *fragments):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluation.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert e.value.__context__.key == key
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert len(err[0]) <= 300
    return err[0]


def test_reruns_that_do_not_match_are_refused_and_change_nothing(setup, tmp_path, capsys):
    f = str(tmp_path / "s.npy")
    rec = f + ".record"
    evaluation.main(eval_args(setup, "SGR", "--save_sims", f))
    before = snapshot(f, rec)
    # another checkpoint
    refused(setup, eval_args(setup, "SGR2", "--save_sims", f), capsys, "output_other_run",
            "s.npy: holds the output of another run (checkpoint sha256 ",
            "in its record); rerun that command to finish it", "--overwrite")
    # another split (its files, its shape)
    refused(setup, eval_args(setup, "SGR", "--save_sims", f, split="dev"), capsys,
            "output_other_run", "(split dev here, test in its record)")
    # another precision
    refused(setup, eval_args(setup, "SGR", "--save_sims", f, "--precision", "bf16"), capsys,
            "output_other_run", "checkpoint precision bf16 here, fp32 in its record")
    assert snapshot(f, rec) == before
    # the record locked by a running evaluation
    held = outputs.claim_output(f, outputs.read_record(rec)[0]["identity"], "--save_sims")
    try:
        refused(setup, eval_args(setup, "SGR", "--save_sims", f), capsys, "output_busy",
                "is being written by another running process")
    finally:
        held.close()
    assert snapshot(f, rec) == before
    # --overwrite starts afresh
    evaluation.main(eval_args(setup, "SGR2", "--save_sims", f, "--overwrite"))
    assert snapshot(f, rec) != before
    assert json.loads(open(rec).readline())["identity"]["checkpoint sha256"] == \
        outputs.file_digest(setup["paths"]["SGR2"])


def test_files_it_did_not_make_are_refused(setup, tmp_path, capsys):
    precious = tmp_path / "precious.npy"
    np.save(precious, np.arange(3.0))
    before = snapshot(str(precious))
    refused(setup, eval_args(setup, "SGR", "--save_sims", str(precious)), capsys,
            "output_not_ours", "precious.npy: exists and was not written by this tool (no "
            "precious.npy.record beside it); pass another --save_sims file, or add --overwrite")
    assert snapshot(str(precious)) == before and not os.path.exists(str(precious) + ".record")
    # a record that is not one
    (tmp_path / "precious.npy.record").write_text("hello\n")
    refused(setup, eval_args(setup, "SGR", "--save_sims", str(precious)), capsys,
            "output_not_ours", "precious.npy.record is not a record")
    assert snapshot(str(precious)) == before
    # a file of the record's name (no matrix beside it) that is not a record
    notes = tmp_path / "notes.npy.record"
    notes.write_text("my notes\n")
    refused(setup, eval_args(setup, "SGR", "--save_sims", str(tmp_path / "notes.npy")), capsys,
            "output_not_ours", "notes.npy.record: exists and was not written by this tool (it "
            "is not a record)")
    assert notes.read_text() == "my notes\n" and not (tmp_path / "notes.npy").exists()
    # np.save's naming: "--save_sims precious" is precious.npy
    refused(setup, eval_args(setup, "SGR", "--save_sims", str(tmp_path / "precious")), capsys,
            "output_not_ours")
    # a directory that does not exist; a directory
    refused(setup, eval_args(setup, "SGR", "--save_sims", str(tmp_path / "no" / "s.npy")),
            capsys, "output_dir", "directory not found; create it, or pass another "
            "--save_sims path")
    (tmp_path / "d.npy").mkdir()
    refused(setup, eval_args(setup, "SGR", "--save_sims", str(tmp_path / "d.npy")), capsys,
            "output_not_ours", "it is a directory")
    # an existing record whose matrix was replaced by another file
    f = str(tmp_path / "s.npy")
    evaluation.main(eval_args(setup, "SGR", "--save_sims", f))
    np.save(f, np.zeros((2, 2)))
    before = snapshot(f, f + ".record")
    refused(setup, eval_args(setup, "SGR", "--save_sims", f), capsys, "output_not_ours",
            "it does not hold the (40, 200) float64 matrix its record describes")
    assert snapshot(f, f + ".record") == before


# ----------------------------------------------------------------------------- the pieces

def test_the_grid_covers_each_pair_once_and_shares_are_balanced():
    for shape in [(1, 5), (8, 40), (40, 200), (100, 500), (1000, 5000), (1001, 5005)]:
        regions = matrix.score_regions(*shape)
        shards = matrix.shard_grid(regions)
        cover = np.zeros(shape, dtype=np.int64)
        for i0, i1, j0, j1 in shards:
            assert 0 < i1 - i0 <= matrix.IMAGE_BLOCK
            assert 0 < j1 - j0 <= matrix.CAPTION_BLOCK
            cover[i0:i1, j0:j1] += 1
        assert (cover == 1).all(), shape
    assert len(matrix.shard_grid(matrix.score_regions(100, 500))) == 64
    assert len(matrix.shard_grid(matrix.score_regions(1000, 5000))) == 100
    assert len(matrix.shard_grid(matrix.score_regions(5000, 25000, fold5=True))) == 500
    # the rounds of score_shards: each process's pairs within one shard of the others'
    shards = matrix.shard_grid(matrix.score_regions(1001, 5005))
    order = sorted(range(len(shards)), key=lambda k: -matrix._pairs(shards[k]))
    for world in (2, 3, 8):
        share = [sum(matrix._pairs(shards[k]) for k in order[r::world])
                 for r in range(world)]
        assert max(share) - min(share) <= matrix._pairs(shards[order[0]])


class Recorder:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


def test_one_bar_over_the_pairs(setup):
    """score_shards advances one bar by the pairs scored, and silences the model's own."""
    model, _, _, _ = evaluation.load_model(setup["paths"]["SGR"], setup["data"], setup["vocab"],
                                           "cpu")
    seen = []
    score = model.score

    def spy(*args, **kwargs):
        seen.append(model.show_progress)
        return score(*args, **kwargs)
    model.score = spy
    img = np.random.rand(12, 36, 16).astype(np.float32)
    cap = np.random.rand(60, 5, 16).astype(np.float32)
    enc = evaluation.Encoded(img, cap, [5] * 60)
    shards = matrix.shard_grid(matrix.score_regions(12, 60))
    out, bar, committed = np.full((12, 60), np.nan), Recorder(), []
    matrix.score_shards([(model, enc)], shards, list(range(len(shards))), out,
                            commit=committed.extend, bar=bar)
    assert bar.n == 12 * 60 and sorted(committed) == list(range(len(shards)))
    assert seen and not any(seen) and model.show_progress
    np.testing.assert_allclose(out, score(img, cap, [5] * 60), rtol=0, atol=1e-6)


def test_record_reading_and_identity_changes(tmp_path):
    path = str(tmp_path / "out.bin")
    rec = outputs.claim_output(path, {"a": 1, "b": "x" * 64}, "--out", made_by="tool.py --out")
    rec.append({"done": [1, 2]})
    rec.close()
    with open(path + ".record", "a") as f:
        f.write('{"done": [3')  # cut short by a crash
    open(path, "w").write("data")
    header, entries = outputs.read_record(path + ".record")
    assert header["identity"] == {"a": 1, "b": "x" * 64} and entries == [{"done": [1, 2]}]
    # a file written in place is its command's by its record (the one question: made_record)
    assert outputs.made_by(path) == "tool.py --out"
    assert outputs.made_record(path)["identity"] == header["identity"]
    again = outputs.claim_output(path, {"a": 1, "b": "x" * 64}, "--out")
    assert again.entries == [{"done": [1, 2]}]
    again.close()
    assert outputs.identity_change({"a": 1, "b": "c" * 64}, header["identity"]) == \
        "b cccccccccccc here, %s in its record" % ("x" * 37 + "...")
    assert outputs.identity_change({"a": 1}, {"a": 1}) is None
