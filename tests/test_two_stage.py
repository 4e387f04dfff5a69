"""Two-stage evaluation (issue 23): `evaluation.py --shortlist CKPT --rerank_k K`.

- The ranking rule on a hand-made matrix: the re-ranked top K, then the shortlist's order; the
  median and mean rank defined for every query; the recall ceiling counted right.
- K >= the gallery gives exactly the exhaustive evaluation's lines and scores, for SGR, NAAF
  and GSMN re-ranking, one model and an ensemble, and with --fold5.
- `--rerank_k 16,32` scores the pairs of K = 32 once; its K = 16 block is a K = 16 run's.
- torchrun with 2 processes prints the lines of 1 process.
- A killed two-stage --save_sims run continues; a mismatched rerun is refused, files unchanged.
- The refusals (a shortlist that cannot embed alone, --rerank_k without --shortlist or <= 0,
  --shortlist without --rerank_k, a shortlist of another split): one line, nothing written.
"""
import argparse
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluation
import matrix
import outputs
import ranking
import twostage
from helpers import REPO, result_lines, save_model_of_flags, snapshot, tiny_dataset
from test_eval_scale import child_env, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEST = 40  # 40 images x 200 captions: a grid of 4 x 4 cells; 5 folds of 8 for --fold5
FLAGS = {"HREM": ["--module_name", "HREM", "--bert_path", os.path.join(REPO, "bert_demo"),
                  "--bert_init", "random", "--nhead", "4"],
         "SGR": ["--module_name", "SGR"], "NAAF": ["--module_name", "NAAF"],
         "GSMN": ["--module_name", "GSMN", "--num_block", "4", "--feat_dim", "4",
                  "--hid_dim", "8"]}

# evaluation.py's main, with folds of 8 images, each unit of pairs slowed down by $SLOW_UNIT
# seconds (so that a kill lands mid-evaluation), each process's pid written to $PID_DIR
PROBE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import evaluation, matrix, twostage
matrix.FOLD_IMAGES = 8
delay = float(os.environ.get("SLOW_UNIT", "0"))
if delay:
    score = twostage.PairUnits.score
    def slow(*args):
        time.sleep(delay)
        return score(*args)
    twostage.PairUnits.score = slow
if os.environ.get("PID_DIR"):
    with open(os.path.join(os.environ["PID_DIR"], "pid%s" % os.environ.get("RANK", "")), "w") as f:
        f.write(str(os.getpid()))
sys.exit(evaluation.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_stage")
    data, vocab = tiny_dataset(str(root), n_train=5, n_dev=5, n_test=N_TEST)
    paths = {}
    for seed, (name, flags) in enumerate(FLAGS.items()):
        torch.manual_seed(seed)
        paths[name] = save_model_of_flags(str(root / ("%s.pth.tar" % name)), data, vocab,
                                          str(root / "run"), flags)
    probe = root / "probe.py"
    probe.write_text(PROBE)
    return argparse.Namespace(root=root, data=data, vocab=vocab, paths=paths, probe=str(probe))


def args(s, *models, extra=()):
    out = ["--model_path", s.paths[models[0]], "--data_path", s.data, "--vocab_path", s.vocab,
           "--split", "test", "--device", "cpu"]
    if len(models) > 1:
        out += ["--model_path2", s.paths[models[1]]]
    return out + list(extra)


def two(s, k, *models, extra=()):
    return args(s, *models, extra=["--shortlist", s.paths["HREM"], "--rerank_k", str(k)] +
                list(extra))


def blocks(stdout):
    """{K: the result lines of its block}."""
    out, k, lines = {}, None, []
    for line in stdout.splitlines():
        if line.startswith("== two-stage evaluation, K = "):
            k, lines = int(line.split("K = ")[1].split(":")[0]), []
        elif line.startswith("== end of the two-stage block"):
            out[k] = result_lines("\n".join(lines))
            k = None
        elif k is not None and not line.startswith("time: "):
            lines.append(line)
    return out


def main_out(capsys, argv):
    capsys.readouterr()
    evaluation.main(argv)
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- the rule

def test_the_ranking_rule_on_a_hand_made_matrix():
    """2 images x 10 captions (image 0's are 0..4, image 1's 5..9). The shortlist ranks image
    0's captions 9 8 ... 0 and image 1's 0 1 ... 9; the re-ranker's scores are the opposite.
    K = 3: image 0's top 3 (9 8 7) re-ranked is 7 8 9, then 6 5 4 ... in the shortlist's
    order, so its best ground truth (4) is at position 5; image 1's (0 1 2) is 2 1 0, then 3 4
    5 ...: position 5. K = 6: 4 5 6 7 8 9 and 5 4 3 2 1 0: both at position 0."""
    short = np.array([np.arange(10.0), -np.arange(10.0)])
    rer = -short
    region = (0, 2, 0, 10)
    found = twostage.shortlist_region(short, 6)
    assert found["cand_i2t"].tolist() == [[9, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5]]
    assert found["pos_i2t"].tolist() == [[9, 8, 7, 6, 5], [5, 6, 7, 8, 9]]
    # t2i: caption 0 ties (0.0 and -0.0): argsort()[::-1] puts image 1 first; the others
    # rank image 0 first
    assert found["cand_t2i"][:, 0].tolist() == [1] + [0] * 9
    assert found["pos_t2i"][:, 0].tolist() == [1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    units = twostage.PairUnits(twostage.union_pairs([found], [region], 6, 10), [region], 10)
    scores = rer.reshape(-1)[units.keys]

    def at(k):
        (m_i, (r_i, top_i)), (m_t, (r_t, top_t)) = twostage.rerank_ranks(found, region, units,
                                                                        scores, k)
        return m_i, r_i.tolist(), top_i.tolist(), m_t, r_t.tolist(), top_t.tolist()
    m_i, r_i, top_i, m_t, r_t, top_t = at(3)
    assert (r_i, top_i) == ([5, 5], [7, 2])
    assert m_i == ranking.metrics(np.array([5.0, 5.0]))  # median and mean defined for all
    # t2i at K = 3 >= the 2 images: the re-ranker's ranking (caption 0 ties again: image 1)
    assert r_t == [1] * 5 + [0] * 5 and top_t == [1] * 10
    m_i, r_i, top_i, *_ = at(6)
    assert (r_i, top_i) == ([0, 0], [4, 5])
    assert m_i == (100.0, 100.0, 100.0, 1.0, 1.0)
    # the ceiling: the share of queries whose ground truth is in the shortlist's top K
    assert twostage.ceiling(found, 3) == (0.0, 100.0)
    assert twostage.ceiling(found, 6) == (100.0, 100.0)
    assert twostage.ceiling(found, 1) == (0.0, 40.0)   # captions 1..4 rank image 0 first
    # K >= the gallery: the re-ranker's exhaustive ranks, both ways
    full = twostage.shortlist_region(short, 10)
    units = twostage.PairUnits(twostage.union_pairs([full], [region], 10, 10), [region], 10)
    (m_i, (r_i, top_i)), (m_t, (r_t, top_t)) = twostage.rerank_ranks(
        full, region, units, rer.reshape(-1)[units.keys], 10)
    e_i, (er_i, et_i) = ranking.i2t(None, None, None, rer, return_ranks=True)
    e_t, (er_t, et_t) = ranking.t2i(None, None, None, rer, return_ranks=True)
    assert (m_i, m_t) == (e_i, e_t)
    assert r_i.tolist() == er_i.tolist() and r_t.tolist() == er_t.tolist()
    assert top_i.tolist() == et_i.tolist() and top_t.tolist() == et_t.tolist()


def test_rule_with_ties_equals_exhaustive_when_k_covers_the_gallery():
    rng = np.random.default_rng(0)
    rer = rng.integers(0, 4, (12, 60)).astype(np.float64)   # many exact ties
    short = rng.standard_normal((12, 60))
    found = twostage.shortlist_region(short, 60)
    region = (0, 12, 0, 60)
    units = twostage.PairUnits(twostage.union_pairs([found], [region], 60, 60), [region], 60)
    got = twostage.rerank_ranks(found, region, units, rer.reshape(-1)[units.keys], 60)
    for (m, (r, top)), fn in zip(got, (ranking.i2t, ranking.t2i)):
        em, (er, et) = fn(None, None, None, rer, return_ranks=True)
        assert m == em and r.tolist() == er.tolist() and top.tolist() == et.tolist()
    # and the shortlist's own results are its exhaustive evaluation's
    assert found["own"].tolist() == list(ranking.i2t(None, None, None, short)) + list(
        ranking.t2i(None, None, None, short))


# ----------------------------------------------------------------------------- K >= gallery

@pytest.mark.parametrize("models", [("SGR",), ("NAAF",), ("GSMN",), ("SGR", "NAAF")])
def test_k_covering_the_gallery_is_the_exhaustive_evaluation(s, tmp_path, capsys, models):
    ref, got = str(tmp_path / "ref.npy"), str(tmp_path / "two.npy")
    exhaustive = main_out(capsys, args(s, *models, extra=["--save_sims", ref]))
    out = main_out(capsys, two(s, 5 * N_TEST, *models, extra=["--save_sims", got]))
    assert blocks(out)[5 * N_TEST] == result_lines(exhaustive)
    assert "ASP: " in blocks(out)[5 * N_TEST][-1]
    pairs = np.load(got)[:, 0]
    units = twostage.PairUnits(np.arange(N_TEST * 5 * N_TEST), [(0, N_TEST, 0, 5 * N_TEST)],
                               5 * N_TEST)
    assert np.array_equal(pairs, np.load(ref).reshape(-1)[units.keys])  # to the bit


def test_fold5_shortlists_within_each_fold(s, capsys, monkeypatch):
    monkeypatch.setattr(matrix, "FOLD_IMAGES", 8)
    exhaustive = main_out(capsys, args(s, "SGR", extra=["--fold5"]))
    assert blocks(main_out(capsys, two(s, 40, "SGR", extra=["--fold5"])))[40] == \
        result_lines(exhaustive)
    out = main_out(capsys, two(s, "3,40", "SGR", extra=["--fold5"]))
    got = blocks(out)
    assert got[3] == blocks(main_out(capsys, two(s, 3, "SGR", extra=["--fold5"])))[3]
    assert len([x for x in got[3] if x.startswith("Image to text: ")]) == 6  # 5 folds + mean
    # K = 3 within a fold of 8 images and 40 captions: the pairs of 5 folds, nothing across
    line = next(x for x in out.splitlines() if x.startswith("pairs scored:"))
    assert line.split()[4] == str(5 * 8 * 40)  # of the folds' pairs, not the whole matrix


# ----------------------------------------------------------------------------- several K

def test_several_k_score_the_largest_ks_pairs_once(s, capsys, monkeypatch):
    scored = []
    score = twostage.PairUnits.score

    def counting(self, scorers, u):
        scored.append(self.size(u))
        return score(self, scorers, u)
    monkeypatch.setattr(twostage.PairUnits, "score", counting)
    out = main_out(capsys, two(s, "16,32", "SGR"))
    found = blocks(out)
    assert sorted(found) == [16, 32]
    n32 = sum(scored)
    scored.clear()
    alone = main_out(capsys, two(s, 16, "SGR"))
    assert blocks(alone)[16] == found[16]
    n16 = sum(scored)
    assert n16 < n32
    lines = [x for x in out.splitlines() if x.startswith("pairs scored:")]
    assert int(lines[0].split()[2]) == n16 and int(lines[1].split()[2]) == n32
    assert out.count("re-ranking") == 2 and "%d pairs, those of K = 16,32, each" % n32 in out


# ----------------------------------------------------------------------------- processes

def command(s, argv, nproc=1):
    if nproc == 1:
        return [sys.executable, s.probe, REPO] + argv
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=%d" % nproc, s.probe, REPO] + argv


def run(s, argv, nproc=1, code=0, **env):
    out = subprocess.run(command(s, argv, nproc), capture_output=True, text=True,
                         env=child_env(**env), cwd=str(s.root), timeout=600)
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_torchrun_two_processes_print_the_lines_of_one(s, tmp_path):
    one, two_ = str(tmp_path / "one.npy"), str(tmp_path / "two.npy")
    argv = two(s, "4,8", "SGR")
    out1 = run(s, argv + ["--save_sims", one]).stdout
    out2 = run(s, argv + ["--save_sims", two_], nproc=2).stdout
    assert blocks(out1) == blocks(out2) and sorted(blocks(out1)) == [4, 8]
    assert out2.count("== two-stage evaluation") == 2  # rank 0 alone prints
    assert np.abs(np.load(one) - np.load(two_)).max() <= 1e-7


def done_units(record):
    return [k for e in outputs.read_record(record)[1] for k in e.get("done", [])]


def test_a_killed_run_continues_and_a_mismatched_rerun_is_refused(s, tmp_path, capsys):
    ref = str(tmp_path / "ref.npy")
    argv = two(s, 4, "SGR")
    ref_out = run(s, argv + ["--save_sims", ref]).stdout
    f = str(tmp_path / "sims.npy")
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen(command(s, argv + ["--save_sims", f]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=child_env(SLOW_UNIT="1.0", PID_DIR=str(pids)), cwd=str(s.root))
    try:
        assert wait_for(lambda: os.path.exists(f + ".record") and
                        len(done_units(f + ".record")) >= 2), "no unit recorded"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = done_units(f + ".record")
    n_units = len(twostage.PairUnits(_keys(ref), [(0, N_TEST, 0, 5 * N_TEST)], 5 * N_TEST))
    assert 2 <= len(before) < n_units, (before, n_units)
    out = run(s, argv + ["--save_sims", f]).stdout
    after = done_units(f + ".record")
    assert sorted(after) == list(range(n_units)) and after[:len(before)] == before
    assert "shortlist read from %s.shortlist.npz" % f in out  # kept by the first run
    assert np.array_equal(np.load(f), np.load(ref))
    assert blocks(out) == blocks(ref_out)
    # once more: nothing to score, the same lines from the files
    again = main_out(capsys, argv + ["--save_sims", f])
    assert "every pair read from" in again and blocks(again) == blocks(ref_out)
    # another K, another re-ranker: refused, the files byte for byte unchanged
    kept = snapshot(tmp_path)
    for other in (two(s, 5, "SGR"), two(s, 4, "NAAF")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            evaluation.main(other + ["--save_sims", f])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the output of another run" in err[0], err
        assert snapshot(tmp_path) == kept


def _keys(saved):
    """The pair keys of a two-stage --save_sims file's shortlist (K = 4, the whole split)."""
    with np.load(saved + ".shortlist.npz") as z:
        found = [{k: z["0_%s" % k] for k in twostage.FOUND_KEYS}]
    return twostage.union_pairs(found, [(0, N_TEST, 0, 5 * N_TEST)], 4, 5 * N_TEST)


# ----------------------------------------------------------------------------- refusals

def refused(s, argv, capsys, key, *fragments):
    before = snapshot(s.root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluation.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and len(err[0]) <= 300, err
    assert e.value.__context__.key == key, err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert snapshot(s.root) == before  # nothing written
    return err[0]


def test_refusals_are_one_line_and_write_nothing(s, tmp_path, capsys):
    saved = ["--save_sims", str(s.root / "refused.npy")]
    refused(s, args(s, "SGR", extra=["--rerank_k", "8"] + saved), capsys,
            "rerank_needs_shortlist", "--rerank_k 8: ", "pass --shortlist")
    refused(s, args(s, "SGR", extra=["--shortlist", s.paths["HREM"]] + saved), capsys,
            "shortlist_needs_k", "--rerank_k K")
    for bad in ("0", "-3", "8,0", "abc"):
        refused(s, two(s, bad, "SGR", extra=saved), capsys, "arguments",
                "--rerank_k", "positive integer")
    refused(s, args(s, "SGR", extra=["--shortlist", s.paths["NAAF"], "--rerank_k", "8"] +
                    saved), capsys, "shortlist_unsupported", "NAAF cannot shortlist",
            "cross-attention")
    # a shortlist of another dataset
    ckpt = torch.load(s.paths["HREM"], weights_only=False)
    ckpt["opt"].data_name = "coco_precomp"
    other = str(s.root / "HREM_coco.pth.tar")
    torch.save(ckpt, other)
    try:
        refused(s, args(s, "SGR", extra=["--shortlist", other, "--rerank_k", "8"] + saved),
                capsys, "shortlist_split", "reads coco_precomp test",
                "the re-ranker reads synth_precomp test")
    finally:
        os.remove(other)


def test_k_past_the_gallery_is_run_and_stated(s, capsys, caplog):
    out = main_out(capsys, two(s, 100, "SGR"))
    assert 100 in blocks(out)
    said = [r.getMessage() for r in caplog.records if "at least the gallery" in r.getMessage()]
    assert len(said) == 1 and "text to image (40 images)" in said[0]


def test_caption_inputs_give_the_scores_of_the_block(s):
    """What a re-ranker computes from the captions alone (SGR's TextSA globals), computed once
    for the split and passed to `score` for a subset of captions: the same scores."""
    model, opt, vocab, _ = evaluation.load_model(s.paths["SGR"], s.data, s.vocab, "cpu")
    loader = evaluation.get_test_loader("test", opt.data_name, vocab, 16, 0, opt,
                                        matcher=type(model))
    img, cap, lens = evaluation.encode_data(model, loader, img_stride=5, progress=False)
    pre = model.caption_inputs(cap, lens)
    assert pre["cap_glo"].shape == (5 * N_TEST, opt.embed_size)
    cols = np.array([3, 17, 18, 90, 150, 199])
    plain = model.score(img[4:5], cap[cols], [lens[j] for j in cols])
    fast = model.score(img[4:5], cap[cols], [lens[j] for j in cols],
                       cap_glo=pre["cap_glo"][cols])
    assert np.abs(plain - fast).max() <= 1e-6
