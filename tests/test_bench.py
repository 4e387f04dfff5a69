"""bench.py at tiny sizes, in this process (no subprocess, no matmul peak): its NAAF jobs score
the same pairs as the per-caption reference, make_model builds every matcher, the NAAF training
step runs, and the FLOP count of the original NAAF evaluation."""
import numpy as np
import pytest

import bench
import errors
import gsmn
import matchers
import naaf
from model import SGRAF


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(*argv):
    args = bench.get_args(["--quick"] + list(argv))
    args.n_img, args.n_cap, args.batch = 6, 20, 6
    args.img_dim, args.embed_size, args.sim_dim, args.word_dim = 24, 48, 16, 8
    args.vocab_size, args.min_len, args.max_len = 30, 1, 9
    return args


def test_naaf_eval_fast_equals_percaption():
    args = tiny_args("--modules", "NAAF")
    fast = bench.job_eval(args, "NAAF", False)["sims"]
    ref = bench.job_eval(args, "NAAF", True)["sims"]
    assert fast.shape == ref.shape == (6, 20) and fast.dtype == np.float64
    assert np.abs(fast - ref).max() < 1e-5
    args.naaf_ref_fp64 = True
    assert np.abs(fast - bench.job_eval(args, "NAAF", True)["sims"]).max() < 1e-5

    # the embeddings put the threshold inside the cosines (both branches at work) ...
    img, cap, lens, _ = bench.make_embeddings(args, np.random.default_rng(args.seed), "NAAF")
    best = np.einsum("brd,cld->bclr", img, cap).max(-1)      # each word's best region
    real = np.arange(cap.shape[1])[None, :] < np.array(lens)[:, None]
    above = (best > args.thres_safe)[:, real].mean()
    assert 0.2 < above < 0.95, above
    # ... so that a wrong threshold shows in the comparison
    model, _ = bench.make_model(args, "NAAF")
    model.opt.thres_safe = 0.2
    other = naaf.percaption_naaf_scores(model, img, cap, lens)
    assert np.abs(other - fast).max() > 1e-3


def test_make_model_every_module():
    args = tiny_args()
    assert args.modules.split(",") == list(matchers.MATCHERS)
    for module in ("SGR", "SAF"):
        model, opt = bench.make_model(args, module)
        assert isinstance(model, SGRAF) and opt.module_name == module
    model, opt = bench.make_model(args, "GSMN")
    assert isinstance(model, gsmn.GSMN) and opt.lambda_softmax == 9.0 and not opt.is_sparse
    model, opt = bench.make_model(args, "NAAF")
    assert isinstance(model, naaf.NAAF)
    assert (opt.thres_safe, opt.lambda_softmax, opt.precomp_enc_text_type) == (0.3, 20.0, "basic")
    assert opt.learning_rate == 0.0005 and opt.thres == 0.0
    with pytest.raises(errors.UsageError, match="--modules SGR,SCAN: unknown SCAN"):
        bench.get_args(["--modules", "SGR,SCAN"])


def test_naaf_train_job():
    args = tiny_args()
    args.min_len = 2  # make_batch writes <start> and <end>
    r = bench.job_train(args, "NAAF", False)
    assert np.isfinite(r["loss"]) and r["grads"].size and np.isfinite(r["grads"]).all()
    with pytest.raises(ValueError, match="no per-caption reference"):
        bench.job_train(args, "NAAF", True)


def test_naaf_original_flops():
    # per pair 4 L R d (cosines and context) + 2 L^2 (smoothed mask); per caption and image
    # shard 2 L^2 d (word-word attention); 130 images are two shards of 128
    L, R, d = 5, 36, 64
    got = bench.original_flops("NAAF", 130, [L], R=R, d=d, shard=128)
    assert got == 130 * (4 * L * R * d + 2 * L * L) + 2 * (2 * L * L * d)
    assert bench.original_flops("NAAF", 130, [L], R=R, d=d, intra=False) == 130 * 4 * L * R * d


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_daa_train_job_fast_equals_percaption(module):
    """bench's DAA training step (`--daa_weight`, `--what daa`): the fast step and the original
    per-caption step take the same loss (hinge + DAA) and the same clipped gradients."""
    args, plain_args = tiny_args("--daa_weight", "10"), tiny_args()
    args.min_len = plain_args.min_len = 3  # <start>, a word, <end>
    fast = bench.job_train(args, module, False)
    ref = bench.job_train(args, module, True)
    plain = bench.job_train(plain_args, module, False)
    assert abs(fast["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert fast["loss"] > plain["loss"]  # the DAA terms are in
    g, gr = fast["grads"], ref["grads"]
    assert np.linalg.norm(g - gr) <= 1e-4 * np.linalg.norm(gr)


def test_daa_cost_job_runs_both_steps():
    args = tiny_args("--daa_weight", "10")
    args.min_len = 3
    r = bench.job_daa(args, "SGR", False)
    assert set(r) == {"with", "without"}
    # seconds of one training step each: floats, finite, positive, and a tiny step's size
    assert all(isinstance(v, float) and np.isfinite(v) and 0 < v < 60 for v in r.values()), r


def test_retrieve_job(tmp_path, monkeypatch):
    """bench.py --what retrieve at a tiny size: an uncached and a cached query, queries on a
    loaded gallery, and the command."""
    args = tiny_args()
    args.gallery, args.settle = 6, 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing in the user's cache
    for module, bert in (("SGR", None), ("GSMN", None), ("HREM", "demo")):
        r = bench.job_retrieve(args, module, False, bert)
        assert set(r) == {"uncached", "cached", "query", "query_plain", "command"}
        # seconds: floats, finite, positive
        assert all(isinstance(v, float) and np.isfinite(v) and 0 < v < 600
                   for v in r.values()), r
        # consistent: a query on the loaded gallery is part of a retrieve() call (which loads
        # the checkpoint and the gallery), and the command a new process that imports torch
        assert r["query"] < min(r["uncached"], r["cached"]), r
        assert r["command"] > max(r["query"], r["query_plain"]), r
    assert not list(tmp_path.iterdir())


def test_gsmn_eval_and_train_jobs_fast_equal_percaption():
    """GSMN's bench jobs: the vectorised scores equal the original shard_xattn's per-caption
    scores (shards of 80), and the fast training step the per-caption one (loss, clipped
    gradients)."""
    args = tiny_args("--modules", "GSMN")
    args.n_img, args.n_cap = 90, 100  # more than one 80 x 80 shard both ways
    # chunks of 6 (16 chunks): with 3-dimensional chunks the float32 cosines of nearly
    # cancelling contexts differ by ~1e-5 between the two paths
    args.embed_size = 96
    fast = bench.job_eval(args, "GSMN", False)["sims"]
    ref = bench.job_eval(args, "GSMN", True)["sims"]
    assert fast.shape == ref.shape == (90, 100) and fast.dtype == np.float64
    assert np.abs(fast - ref).max() < 1e-5
    assert fast.std() > 1e-3  # not a constant
    args.min_len, args.gsmn_batch = 3, 7
    f, r = bench.job_train(args, "GSMN", False), bench.job_train(args, "GSMN", True)
    assert abs(f["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"])
    assert np.linalg.norm(f["grads"] - r["grads"]) <= 1e-4 * np.linalg.norm(r["grads"])
    assert bench.original_flops("GSMN", 2, [5], R=36, d=64) == 2 * (
        8 * 5 * 36 * 64 + 2 * 36 * 8 * 36 * 16 + 2 * 36 * (16 * 32 + 32 * 32 + 32) +
        2 * 5 * 8 * 5 * 16 + 2 * 5 * (16 * 32 + 32 * 32 + 32)) + 2 * 5 * 5 * 64


FAKE_ORIGINAL_MODEL = '''import argparse

import gsmn


class GSMN:
    """Stands in for the original's GSMN: ours, built from the original's opt."""

    def __init__(self, opt):
        o = argparse.Namespace(**vars(opt), module_name="GSMN", device="cpu")
        gsmn.GSMN.complete_opt(o)
        self.m = gsmn.GSMN(o)

    def val_start(self):
        self.m.val_start()

    def state_dict(self):
        return self.m.state_dict()
'''

FAKE_ORIGINAL_EVALUATION = '''import torch


def shard_xattn(model, images, captions, boxes, deps, caplens, opt, shard_size=80):
    assert boxes.dtype.name == "float64" and len(deps) == len(caplens)
    return model.m.score(images, captions, caplens, boxes=torch.from_numpy(boxes).float())
'''


def test_original_job_sets_our_modules_aside_and_back(tmp_path):
    """--gsmn_original: the checkout's model.py and evaluation.py are imported under their own
    names while ours step aside, and ours are back afterwards (a fake checkout whose GSMN is
    ours, so the fast path with its weights scores the same)."""
    import sys

    import evaluation
    import model
    (tmp_path / "model.py").write_text(FAKE_ORIGINAL_MODEL)
    (tmp_path / "evaluation.py").write_text(FAKE_ORIGINAL_EVALUATION)
    args = tiny_args("--modules", "GSMN", "--gsmn_original", str(tmp_path))
    assert matchers.matcher_class("GSMN").bench_original_code(args) == str(tmp_path)
    r = bench.job_original(args, "GSMN", True)
    assert r["sims"].shape == (6, 20) and r["time"] > 0
    assert r["fast_diff"] < 1e-6
    assert sys.modules["model"] is model and sys.modules["evaluation"] is evaluation
    assert str(tmp_path) not in sys.path


def test_precision_list_and_train_job_in_bf16():
    """--precision fp32,bf16 is checked as a list; the train job runs in bf16 (autocast in
    the train step: a finite loss, other than fp32's) and the table puts both side by side."""
    with pytest.raises(errors.SGRAFError):
        bench.get_args(["--precision", "fp32,fp16"])
    losses = {}
    for precision in ("fp32", "bf16"):
        args = tiny_args("--precision", precision)
        args.min_len = 2  # make_batch writes <start> and <end>
        losses[precision] = bench.job_train(args, "SAF", False)["loss"]
    assert np.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]
    rows = {("SAF", None): {"train fp32": 2.0, "train per-caption": 5.0, "train bf16": 1.0},
            ("HREM", "demo BERT"): {"train fp32": 3.0, "train bf16": 1.5}}
    lines = bench.markdown_table(rows).splitlines()
    assert lines[0] == ("| matcher | train fp32 (s) | train bf16 (s) | train per-caption (s) | "
                        "train per-caption / train fp32 | train fp32 / train bf16 |")
    assert lines[2] == "| SAF | 2.000 | 1.000 | 5.000 | 2.50x | 2.00x |"
    assert lines[3] == "| HREM (demo BERT) | 3.000 | 1.500 |  |  | 2.00x |"


def test_gpu_check_without_cuda_says_so_and_exits_0():
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "gpu_check.py")], cwd=repo,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [r.stdout.strip()]  # one line
    assert "CUDA is not available" in r.stdout
