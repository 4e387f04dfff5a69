"""synthetic.py: SCAN-format files, determinism, vocab coverage, and learnable content."""
import json
import os

import numpy as np
import pytest

import outputs
import synthetic
from vocab import UNK, deserialize_vocab, tokenize

SIZES = dict(n_train=300, n_dev=30, n_test=60, img_dim=64)
SPLITS = ("train", "dev", "test")


def _make(root, **kw):
    args = dict(SIZES, **kw)
    return synthetic.make_synthetic(os.path.join(root, "data"), "synth_precomp",
                                    os.path.join(root, "vocab"), **args)


def _read_caps(out, split):
    with open(os.path.join(out["data_dir"], "%s_caps.txt" % split), encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def _read_ims(out, split):
    return np.load(os.path.join(out["data_dir"], "%s_ims.npy" % split))


def _all_bytes(out):
    # the data's bytes; the record of who made them holds their times
    files = sorted(f for f in os.listdir(out["data_dir"]) if f != outputs.MARKER)
    blobs = {f: open(os.path.join(out["data_dir"], f), "rb").read() for f in files}
    blobs["vocab"] = open(out["vocab_file"], "rb").read()
    return blobs


def concept_words():
    """Lowercase token -> concept id, for every word a caption uses to name a concept."""
    words = {}
    for i, (sing, plur) in enumerate(synthetic.SUBJECTS):
        words.update({w: synthetic.SUBJ0 + i for w in sing + plur})
    for i, (forms, _) in enumerate(synthetic.OBJECTS):
        words.update({w: synthetic.OBJ0 + i for w in forms})
    words.update({c: synthetic.COL0 + i for i, c in enumerate(synthetic.COLOURS)})
    for i, (names, _) in enumerate(synthetic.SCENES):
        words.update({w: synthetic.SCENE0 + i for w in names})
    return words


def is_present(data_path, data_name, vocab_path):
    """True when train/dev/test features and captions and the vocab json all exist."""
    files = [os.path.join(data_path, data_name, "%s_%s" % (s, f))
             for s in SPLITS for f in ("ims.npy", "caps.txt")]
    files.append(os.path.join(vocab_path, "%s_vocab.json" % data_name))
    return all(os.path.isfile(p) for p in files)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _make(str(tmp_path_factory.mktemp("synth")))


def test_files_shapes_and_captions(ds):
    files = ["%s_%s" % (s, f) for s in SPLITS for f in ("ims.npy", "caps.txt")] + \
        ["synthetic.json"]
    assert sorted(os.listdir(ds["data_dir"])) == sorted(files + [outputs.MARKER])
    for name in files:  # each recorded as synthetic.py's
        assert outputs.made_by(os.path.join(ds["data_dir"], name)) == "synthetic.py"
    for split in SPLITS:
        n = SIZES["n_" + split]
        ims = _read_ims(ds, split)
        assert ims.dtype == np.float32 and ims.shape == (n, 36, SIZES["img_dim"])
        assert ims.min() >= 0 and np.isfinite(ims).all()  # ReLU-like, as BUTD features
        caps = _read_caps(ds, split)
        assert len(caps) == 5 * n and all(c.strip() == c and c for c in caps)
        lengths = [len(tokenize(c)) for c in caps]
        assert 6 <= min(lengths) and max(lengths) <= 21  # 20 words + final "."
        # the five captions of an image are written independently: mostly different
        distinct = [len(set(caps[5 * i:5 * i + 5])) for i in range(n)]
        assert np.mean(distinct) >= 4.5
    assert ds["sizes"] == {"train": 300, "dev": 30, "test": 60}
    assert is_present(os.path.dirname(ds["data_dir"]), "synth_precomp",
                      os.path.dirname(ds["vocab_file"]))


def test_images_are_distinct():
    split = synthetic.generate_split("test", 200, seed=0, img_dim=16)
    keys = {(c.subject, c.object, c.colour, c.scene) for c in split.contents}
    assert len(keys) == 200
    assert all(2 <= len(c.concepts()) <= 4 for c in split.contents)


def test_deterministic(tmp_path, ds):
    first = _all_bytes(ds)
    again = _all_bytes(_make(str(tmp_path / "a")))
    assert again == first
    other = _all_bytes(_make(str(tmp_path / "b"), seed=1))
    for split in SPLITS:
        for f in ("_ims.npy", "_caps.txt"):
            assert other[split + f] != first[split + f]
    # one split's size does not change the others
    smaller = _all_bytes(_make(str(tmp_path / "c"), n_train=100))
    assert smaller["test_ims.npy"] == first["test_ims.npy"]
    assert smaller["dev_caps.txt"] == first["dev_caps.txt"]


def test_skip_overwrite_and_testall(tmp_path):
    out = _make(str(tmp_path), n_train=20, n_dev=5, n_test=8)
    assert len(out["written"]) == 8 and not out["skipped"]
    again = _make(str(tmp_path), n_train=20, n_dev=5, n_test=8)
    assert not again["written"] and len(again["skipped"]) == 8
    full = _make(str(tmp_path), n_train=20, n_dev=5, n_test=8, n_testall=12, overwrite=True)
    assert len(full["written"]) == 10
    assert not [f for f in os.listdir(full["data_dir"]) if f.endswith(".tmp")]
    # test is the first n_test images of testall
    np.testing.assert_array_equal(_read_ims(full, "testall")[:8], _read_ims(full, "test"))
    assert _read_caps(full, "testall")[:40] == _read_caps(full, "test")
    meta = json.load(open(os.path.join(full["data_dir"], "synthetic.json")))
    assert meta["sizes"]["testall"] == 12


def test_vocab_covers_captions(ds):
    vocab = deserialize_vocab(ds["vocab_file"])
    assert [vocab.idx2word[i] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    for word in concept_words():
        assert word in vocab.word2idx, word
    tokens = [t for c in _read_caps(ds, "test") for t in tokenize(c)]
    assert sum(vocab(t) == vocab(UNK) for t in tokens) <= 0.01 * len(tokens)


def _recall(scores, k):
    """scores (5N captions, N images): fraction of captions whose image is in the top k."""
    target = np.arange(scores.shape[0]) // 5
    rank = (scores > scores[np.arange(len(target)), target][:, None]).sum(1)
    return float(np.mean(rank < k))


def test_oracle_retrieves_images_from_captions(ds):
    """An oracle that knows the concept directions: a caption scores an image by how
    strongly the image's best region shows each concept the caption names."""
    ims, caps = _read_ims(ds, "test"), _read_caps(ds, "test")
    dirs = synthetic.concept_directions(0, SIZES["img_dim"])
    shown = (ims @ dirs.T / SIZES["img_dim"]).max(1)  # (N, K) concept evidence per image
    words = concept_words()
    named = np.zeros((len(caps), synthetic.N_CONCEPTS))  # (5N, K)
    for i, c in enumerate(caps):
        for t in tokenize(c):
            if t in words:
                named[i, words[t]] = 1
    assert named.sum(1).min() >= 2  # every caption names >= 2 concepts
    scores = named @ shown.T  # (5N, N)
    n = ims.shape[0]
    assert _recall(scores, 1) > 0.5 and _recall(scores, 5) > 0.9  # chance: 1/60, 5/60
    # and the information is in the pairing: shuffled images fall to chance
    perm = np.random.default_rng(0).permutation(n)
    assert _recall(scores[:, perm], 5) < 0.3


def test_learnable_without_oracle(ds):
    """Least squares from train bags of words to train mean-region features, with no
    knowledge of the generator, already retrieves held-out test images."""
    vocab = deserialize_vocab(ds["vocab_file"])

    def bow(caps):
        x = np.zeros((len(caps), len(vocab)))
        for i, c in enumerate(caps):
            for t in tokenize(c):
                x[i, vocab(t)] += 1
        return x

    def img(split):
        m = _read_ims(ds, split).mean(1)
        return m - m.mean(0)

    x, y = bow(_read_caps(ds, "train")), np.repeat(img("train"), 5, axis=0)
    w = np.linalg.solve(x.T @ x + 1.0 * np.eye(x.shape[1]), x.T @ y)
    pred, target = bow(_read_caps(ds, "test")) @ w, img("test")
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    scores = pred @ target.T
    assert _recall(scores, 5) > 0.5  # chance 5/60
