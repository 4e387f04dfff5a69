"""Nothing read back is trusted blindly (issue 27): the --save_sims matrix and its record, and
the retrieval cache, carry checksums written with them and checked when read.

- Any byte range of any file they wrote, damaged at random (a fixed seed, 50 trials per file),
  gives the undamaged result (damaged shards scored again, a damaged cache entry encoded
  again) or a one-line refusal: never another number.
- The issue's cases, end to end: rows zeroed or NaN, a matrix cut to 5,000 bytes, a record line
  `{"done": null}`, a header `{"identity": 5}`; a cache entry with flipped bytes, an edited
  caption, a corrupt gallery.npz.
- A lock dies with its process: a forked child (a DataLoader worker) does not keep it.
- Non-finite embeddings or scores, a UTF-16 caption file, a pickled feature array: one line
  naming the cause.
"""
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import data
import errors
import evaluation
import matrix
import outputs
import retrieve
from cache import CACHE_FILES, CacheDamaged, Digests, Encodings, LAZY
from helpers import expect_exit, result_lines
from test_bad_input import N_TEST, Work, base  # noqa: F401
from vocab import read_lines

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIALS = 50


@pytest.fixture
def work(base, tmp_path):  # noqa: F811
    shutil.copytree(base, tmp_path / "w")
    return Work(tmp_path / "w")


def damage(path, rng):
    """Damage a random byte range of `path` (or, one time in five, cut it short)."""
    size = os.path.getsize(path)
    if size == 0 or rng.random() < 0.2:
        with open(path, "r+b") as f:
            f.truncate(rng.randrange(size) if size else 0)
        return
    start = rng.randrange(size)
    n = min(size - start, rng.choice([1, 1, 2, 8, 64, 4096]))
    with open(path, "r+b") as f:
        f.seek(start)
        old = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ rng.randrange(1, 256) for b in old))


def one_line(e):
    msg = str(e)
    assert "\n" not in msg and len(msg) <= 300 and isinstance(e, errors.SGRAFError), msg


# ----------------------------------------------------------------------------- --save_sims

class Fixed:
    """A matcher whose score of images x captions is a block of a fixed matrix."""
    show_progress = True

    def __init__(self, ref):
        self.ref = ref

    def score(self, img, cap, lens):
        return self.ref[np.ix_(img, cap)]


SHAPE = (40, 200)  # 4 x 4 shards
GRID = matrix.shard_grid(matrix.score_regions(*SHAPE))
IDENT = {"checkpoint sha256": "0" * 64, "shape": list(SHAPE)}


def save_sims(path, ref):
    """An evaluation --save_sims of the matrix `ref` (or its rerun): the matrix it ends with,
    and the shards it found scored."""
    saved = matrix.SavedSims(path)
    try:
        done = saved.claim(IDENT, SHAPE, GRID)
        enc = evaluation.Encoded(np.arange(SHAPE[0]), np.arange(SHAPE[1]), [1] * SHAPE[1])
        todo = [k for k in range(len(GRID)) if k not in done]
        matrix.score_shards([(Fixed(ref), enc)], GRID, todo, saved.sims,
                                commit=saved.commit)
        return np.array(saved.sims), done
    finally:
        saved.close()


@pytest.mark.parametrize("target", [".npy", ".npy.record"])
def test_save_sims_after_any_damage_is_the_matrix_or_a_refusal(tmp_path, target, caplog):
    ref = np.random.RandomState(0).rand(*SHAPE)
    good = str(tmp_path / "good.npy")
    assert np.array_equal(save_sims(good, ref)[0], ref)
    rng = random.Random(27)
    outcomes = {"same": 0, "rescored": 0, "refused": 0}
    for trial in range(TRIALS):
        path = str(tmp_path / ("t%d.npy" % trial))
        shutil.copy2(good, path)
        shutil.copy2(good + ".record", path + ".record")
        damage(path[:-4] + target, rng)
        caplog.clear()
        try:
            sims, done = save_sims(path, ref)
        except errors.SGRAFError as e:
            one_line(e)
            outcomes["refused"] += 1
            continue
        assert np.array_equal(sims, ref), trial  # never another number
        assert np.array_equal(np.load(path), ref)
        outcomes["same" if len(done) == len(GRID) else "rescored"] += 1
        warned = [r.getMessage() for r in caplog.records if "scored again" in r.getMessage()]
        # one line, when a shard was lost to damage (a record cut short is a kill's: silent)
        if target == ".npy":
            assert len(warned) == (len(done) < len(GRID)), warned
        else:
            assert len(warned) <= 1, warned
    assert outcomes["rescored"] > 0, outcomes  # the damage was seen, and repaired


def test_a_cut_matrix_is_completed_with_nan_never_zeros(tmp_path):
    ref = np.random.RandomState(1).rand(*SHAPE)
    path = str(tmp_path / "s.npy")
    save_sims(path, ref)
    with open(path, "r+b") as f:
        f.truncate(5000)
    saved = matrix.SavedSims(path)
    try:
        done = saved.claim(IDENT, SHAPE, GRID)
        assert os.path.getsize(path) == 128 + 8 * SHAPE[0] * SHAPE[1]
        # only the shards wholly inside the first 5,000 bytes survive; the rest is unscored
        assert len(done) < len(GRID)
        cut = (5000 - 128) // 8
        assert np.isnan(saved.sims.reshape(-1)[cut:]).all()
        assert not (saved.sims.reshape(-1)[cut:] == 0).any()
    finally:
        saved.close()
    assert np.array_equal(save_sims(path, ref)[0], ref)


def test_record_lines_of_the_wrong_shape(tmp_path):
    ref = np.random.RandomState(2).rand(*SHAPE)
    path = str(tmp_path / "s.npy")
    save_sims(path, ref)
    with open(path + ".record", "a") as f:
        f.write('{"done": null}\n{"done": [99], "crc32": [1]}\n[1, 2]\n')
    sims, done = save_sims(path, ref)
    assert np.array_equal(sims, ref) and len(done) == len(GRID)
    lines = open(path + ".record").read().splitlines()
    lines[0] = json.dumps({"identity": 5})
    open(path + ".record", "w").write("\n".join(lines) + "\n")
    with pytest.raises(errors.SGRAFError) as e:
        save_sims(path, ref)
    assert e.value.key == "output_not_ours" and "is not a record" in str(e.value)


def test_the_issues_save_sims_cases_end_to_end(work, capsys, caplog):
    sims = str(work.root / "s.npy")
    args = work.eval_args("--save_sims", sims)
    evaluation.main(args)
    ref_lines = result_lines(capsys.readouterr().out)
    ref = np.load(sims)

    def rerun():
        caplog.clear()
        evaluation.main(args)
        out = capsys.readouterr().out
        assert result_lines(out) == ref_lines
        assert np.array_equal(np.load(sims), ref)
        return [r.getMessage() for r in caplog.records if "scored again" in r.getMessage()]

    for value in (0.0, np.nan):  # three rows zeroed, or NaN
        m = np.load(sims, mmap_mode="r+")
        m[3:6] = value
        m.flush()
        del m
        assert len(rerun()) == 1
    with open(sims, "r+b") as f:
        f.truncate(1000)  # (the issue's 5,000 bytes of a larger matrix)
    assert len(rerun()) == 1
    with open(sims + ".record", "a") as f:
        f.write('{"done": null}\n')
    assert len(rerun()) == 1
    lines = open(sims + ".record").read().splitlines()
    open(sims + ".record", "w").write("\n".join([json.dumps({"identity": 5})] + lines[1:]) +
                                      "\n")
    expect_exit(evaluation.main, args, capsys, "output_not_ours", "is not a record",
                root=work.root)


# ----------------------------------------------------------------------------- the cache

def encodings():
    rng = np.random.RandomState(3)
    lens = rng.randint(3, 9, size=20)
    return Encodings(rng.rand(4, 5, 8).astype(np.float32),
                              rng.rand(int(lens.sum()), 8).astype(np.float32), lens,
                              {"ids": [np.arange(3), 7]}, ["caption %d" % k for k in range(20)],
                              5, gallery={"glob": rng.rand(4, 8).astype(np.float32)})


def same(a, b):
    assert np.array_equal(a.img_embs, b.img_embs) and np.array_equal(a.cap_embs, b.cap_embs)
    assert np.array_equal(a.cap_lens, b.cap_lens) and a.captions == b.captions
    assert a.im_div == b.im_div and set(a.gallery) == set(b.gallery)
    assert all(np.array_equal(a.gallery[k], b.gallery[k]) for k in a.gallery)
    assert np.array_equal(a.extra["ids"][0], b.extra["ids"][0])
    assert a.extra["ids"][1] == b.extra["ids"][1]


@pytest.mark.parametrize("name", list(CACHE_FILES) + [outputs.MARKER])
def test_a_cache_entry_after_any_damage_is_itself_or_encoded_again(tmp_path, name):
    enc = encodings()
    good = str(tmp_path / "cache" / "entry")
    assert enc.save(good, {"checkpoint": "x"})
    same(Encodings.load(good), enc)
    rng = random.Random(zlib.crc32(name.encode()))
    missed = 0
    for trial in range(TRIALS):
        entry = str(tmp_path / "cache" / ("t%d" % trial))
        shutil.copytree(good, entry)
        damage(os.path.join(entry, name), rng)
        loaded = Encodings.load(entry)
        if loaded is None:
            missed += 1  # never served: encoded again (or refused, when its record is gone)
            continue
        try:
            same(loaded, enc)
        except CacheDamaged:  # the captions, checked when first read
            assert name == LAZY
            missed += 1
    assert missed > 0


def test_the_digests_file_after_any_damage_is_itself_or_computed_again(tmp_path):
    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    d = Digests(cache_dir)
    for k in range(5):
        p = tmp_path / ("f%d" % k)
        p.write_text("x" * k)
        d(str(p))
    d.save()
    path = os.path.join(cache_dir, "digests.json")
    good, st = open(path, "rb").read(), os.stat(path)
    rng = random.Random(5)
    for trial in range(TRIALS):
        with open(path, "wb") as f:
            f.write(good)
        damage(path, rng)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # its record still holds
        try:
            again = Digests(cache_dir)
        except errors.SGRAFError as e:  # a size that no longer matches its record
            one_line(e)
            continue
        assert again.files in (d.files, {}), trial


@pytest.fixture
def query(work):
    def run(cache):
        return retrieve.retrieve(str(work.sgr), query="a dog runs", data_path=str(work.data),
                                 split="test", vocab_path=str(work.vocab), device="cpu",
                                 cache_dir=cache, topk=5)
    return run


@pytest.fixture
def image_query(work):
    def run(cache):
        return retrieve.retrieve(str(work.sgr), image=3, data_path=str(work.data),
                                 split="test", vocab_path=str(work.vocab), device="cpu",
                                 cache_dir=cache, topk=5)
    return run


def test_the_issues_cache_cases_end_to_end(work, query, image_query, caplog):
    cache = str(work.root / "cache")
    ref = query(None)
    image_ref = image_query(None)
    assert not query(cache)["cached"] and query(cache)["cached"]
    entry = next(os.path.join(cache, n) for n in os.listdir(cache)
                 if os.path.isdir(os.path.join(cache, n)))

    def edit(name, fn):
        p = os.path.join(entry, name)
        with open(p, "rb") as f:
            raw = f.read()
        with open(p, "wb") as f:
            f.write(fn(raw))

    flip = lambda b: b[:300] + bytes(x ^ 0x5a for x in b[300:308]) + b[308:]  # noqa: E731
    cases = [("images.npy", flip), ("captions.npy", flip),
             ("meta.json", lambda b: b.replace(b'"captions": ["', b'"captions": ["EDITED ')),
             ("gallery.npz", lambda b: b[:40] + b"\0" * 40 + b[80:])]
    for name, fn in cases:
        edit(name, fn)
        caplog.clear()
        caplog.set_level(logging.WARNING)
        hits = query(cache)
        if name == LAZY:  # a text query never reads the captions: an image query does
            assert hits["cached"] and hits["results"] == ref["results"]
            hits = image_query(cache)
            assert hits["results"] == image_ref["results"]
        assert not hits["cached"] and hits["results"] == (
            image_ref if name == LAZY else ref)["results"], name
        warned = [r.getMessage() for r in caplog.records if "cache entry is damaged" in
                  r.getMessage()]
        assert len(warned) == 1 and name in warned[0], warned
        assert query(cache)["cached"]  # replaced by a whole entry


# ----------------------------------------------------------------------------- the locks

HOLDER = """
import multiprocessing, os, sys, time
sys.path.insert(0, sys.argv[1])
import outputs

def worker():
    open(sys.argv[2] + ".started", "w").close()  # (after the fork hooks)
    time.sleep(60)

rec = outputs.claim_output(sys.argv[2], {"a": 1}, "--save_sims", made_by="t")
child = multiprocessing.get_context("fork").Process(target=worker)
child.start()  # as a DataLoader worker
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_lock_dies_with_its_process_not_with_its_children(tmp_path):
    path = str(tmp_path / "s.npy")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, REPO, path], stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    try:
        end = time.time() + 60
        while not os.path.exists(path + ".started") and time.time() < end:
            time.sleep(0.05)
        with pytest.raises(errors.SGRAFError) as e:  # held while its process lives
            outputs.claim_output(path, {"a": 1}, "--save_sims")
        assert e.value.key == "output_busy"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the forked child still runs...
        start = time.time()
        rec = outputs.claim_output(path, {"a": 1}, "--save_sims")  # ...and holds nothing
        rec.close()
        assert time.time() - start < 1
    finally:
        for pid in (proc.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


# ----------------------------------------------------------------------------- inputs

def test_a_nan_in_any_image_is_named_not_ranked(work, capsys):
    sampled = set(data.sample_indices(N_TEST))
    feats = np.load(work.ds / "test_ims.npy")
    for i in [i for i in range(N_TEST) if i not in sampled]:
        bad = feats.copy()
        bad[i, 7, 3] = np.nan
        np.save(work.ds / "test_ims.npy", bad)
        expect_exit(evaluation.main, work.eval_args(), capsys, "embeddings_nonfinite",
                    "images %d encode to NaN or Inf" % i)


def test_non_finite_captions_and_scores_are_named():
    img = np.zeros((3, 2, 4), np.float32)
    cap = np.zeros((5, 6, 4), np.float32)
    cap[3, 1, 0] = np.inf
    with pytest.raises(errors.SGRAFError) as e:
        evaluation.check_encoded(evaluation.Encoded(img, cap, [6] * 5), "SGR", "test_caps.txt")
    assert e.value.key == "embeddings_nonfinite" and "captions 3 encode" in str(e.value)
    block = np.zeros((4, 5))
    block[2, 1] = np.nan
    with pytest.raises(errors.SGRAFError) as e:
        matrix.check_block(block, (10, 14, 50, 55))
    assert e.value.key == "scores_nonfinite" and "images 12 x captions 51 " in str(e.value)
    matrix.check_block(np.ones((4, 5)), (0, 4, 0, 5))  # finite: nothing to say


def test_utf16_captions(work, capsys, tmp_path):
    caps = work.ds / "test_caps.txt"
    text = caps.read_text(encoding="utf-8")
    expected = read_lines(str(caps))[0]
    for codec in ("utf-16", "utf-16-be"):  # with a byte-order mark: read as such
        bom = b"\xfe\xff" if codec == "utf-16-be" else b""
        (tmp_path / "c.txt").write_bytes(bom + text.encode(codec))
        assert read_lines(str(tmp_path / "c.txt")) == (expected, [])
    caps.write_bytes(text.encode("utf-16-le"))  # none: refused before any compute
    expect_exit(evaluation.main, work.eval_args(), capsys, "oov_refused", "NUL bytes",
                "--vocab_path", root=work.root, new_allowed=False)


def test_a_pickled_feature_array_is_named(work, capsys):
    objects = np.empty(N_TEST, dtype=object)
    objects[:] = [np.zeros((36, 32), np.float32) for _ in range(N_TEST)]
    np.save(work.ds / "test_ims.npy", objects, allow_pickle=True)
    expect_exit(evaluation.main, work.eval_args(), capsys, "features_pickled",
                "a pickled object array, not a numeric .npy")
