"""Search and pictures. retrieve.py: a text or image query against a split gives that query's
column or row of `evaluation.py --save_sims` (SGR, SAF, NAAF, an ensemble); the cache is used
the second time and invalidated by a changed checkpoint, feature or caption file; the one-line
errors; the attention maps of --explain; a matcher with global embeddings and no attention.
evaluation.py --plots: the three figures, for a single model and an ensemble, whose recall
curve at K = 1, 5, 10 is the printed R@K."""
import argparse
import hashlib
import json
import os
import re
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import errors
import contract
import evaluation
import helpers
import matchers
import naaf
import outputs
import plots
import retrieve
from conftest import REPO
from contract import l2norm
from cache import Digests, RACY_NS
from helpers import save_model_of_flags, tiny_dataset
from model import SGRAF
from test_contract import Toy
from test_eval_cli import original_opt
from test_gsmn_integration import add_gsmn_files
from test_naaf_integration import original_naaf_opt
from vocab import deserialize_vocab, tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEST = 12  # images of the test split (60 captions)
CASES = {"SGR": ("SGR",), "SAF": ("SAF",), "NAAF": ("NAAF",), "SGR+NAAF": ("SGR", "NAAF")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny split, original-format checkpoints of SGR, SAF and NAAF (in their own folder),
    and each case's --save_sims matrix written by evaluation.py."""
    root = tmp_path_factory.mktemp("retrieve")
    data_path, vocab_path = tiny_dataset(str(root), n_train=5, n_dev=4, n_test=N_TEST)
    n_vocab = len(deserialize_vocab(os.path.join(vocab_path, "synth_precomp_vocab.json")))
    os.makedirs(root / "ckpt")
    paths = {}
    for seed, name in enumerate(["SGR", "SAF", "NAAF"]):
        torch.manual_seed(seed)
        opt = original_naaf_opt(n_vocab) if name == "NAAF" else original_opt(name, n_vocab)
        opt.workers = 0
        cls = naaf.NAAF if name == "NAAF" else SGRAF
        m = cls(argparse.Namespace(**vars(opt), device="cpu"))
        paths[name] = str(root / "ckpt" / ("%s.pth.tar" % name))
        torch.save({"epoch": 1, "model": m.state_dict(), "best_rsum": 0.0, "opt": opt,
                    "Eiters": 1}, paths[name])
    sims = {}
    for case, names in CASES.items():
        f = str(root / ("%s.npy" % case))
        evaluation.main(["--model_path", paths[names[0]], "--data_path", data_path,
                         "--vocab_path", vocab_path, "--split", "test", "--device", "cpu",
                         "--save_sims", f] +
                        (["--model_path2", paths[names[1]]] if len(names) > 1 else []))
        sims[case] = np.load(f)
    captions = open(os.path.join(data_path, "synth_precomp", "test_caps.txt"),
                    encoding="utf-8").read().splitlines()
    return argparse.Namespace(root=root, data=data_path, vocab=vocab_path, paths=paths,
                              sims=sims, captions=captions)


def args(s, case, *extra, cache=None):
    names = CASES[case]
    return (["--model_path", s.paths[names[0]], "--data_path", s.data, "--vocab_path", s.vocab,
             "--split", "test", "--device", "cpu"] +
            (["--model_path2", s.paths[names[1]]] if len(names) > 1 else []) +
            (["--cache_dir", str(cache)] if cache else ["--no_cache"]) + list(extra))


def run_json(argv, capsys):
    capsys.readouterr()
    assert retrieve.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_ranking(results, ref, k):
    """The results are the top k of `ref` (a column or row of --save_sims) in its order, with
    its scores (1e-6); two results may only swap where their reference scores tie (1e-6)."""
    order = np.argsort(-ref, kind="stable")[:k]
    got = [r["index"] for r in results]
    assert len(got) == k
    np.testing.assert_allclose([r["score"] for r in results], ref[got], rtol=0, atol=1e-6)
    for g, o in zip(got, order):
        assert g == o or abs(ref[g] - ref[o]) < 1e-6, (got, order.tolist())
    assert [r["rank"] for r in results] == list(range(1, k + 1))


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", list(CASES))
def test_text_and_image_queries_equal_the_save_sims_matrix(setup, case, tmp_path, capsys):
    s, sims = setup, setup.sims[case]
    cache = tmp_path / "cache"
    for j in (0, 17, 59):  # a query equal to caption j: column j
        out = run_json(args(s, case, "--query", s.captions[j], "--topk", "5", cache=cache),
                       capsys)
        assert out["query"]["text"] == s.captions[j]
        assert_same_ranking(out["results"], sims[:, j], 5)
        for r in out["results"]:
            i = r["index"]
            assert r["captions"] == s.captions[5 * i:5 * i + 5]  # the image's own captions
    for i in (0, N_TEST - 1):  # --image N: row N
        out = run_json(args(s, case, "--image", str(i), "--topk", "7", cache=cache), capsys)
        assert out["query"] == {"image": i, "captions": s.captions[5 * i:5 * i + 5]}
        assert_same_ranking(out["results"], sims[i], 7)
        for r in out["results"]:
            assert r["text"] == s.captions[r["index"]]
            assert r["image"] == r["index"] // 5 and r["match"] == (r["index"] // 5 == i)
    # the whole column and row, through the importable function, without the cache
    hits = retrieve.retrieve(s.paths[CASES[case][0]], query=s.captions[23], topk=N_TEST,
                             data_path=s.data, vocab_path=s.vocab, device="cpu",
                             model_path2=(s.paths[CASES[case][1]] if len(CASES[case]) > 1
                                          else None), cache_dir=None)
    assert_same_ranking(hits["results"], sims[:, 23], N_TEST)


def test_table_reports_unknown_words(setup, capsys):
    s = setup
    capsys.readouterr()
    assert retrieve.main(args(s, "SGR", "--query", "A dog zorbles the Flumph", "--topk",
                              "3")) == 0
    out = capsys.readouterr().out.splitlines()
    assert 'query: "A dog zorbles the Flumph" (5 words; 2 not in the vocabulary, mapped to ' \
           '<unk>: zorbles, flumph)' in out
    assert out[2].split() == ["rank", "image", "score", "ground-truth", "captions"]
    assert [int(line.split()[0]) for line in out[3:] if line[:4].strip()] == [1, 2, 3]
    res = run_json(args(s, "SGR", "--query", "A dog zorbles the Flumph"), capsys)
    assert res["query"]["unknown"] == ["zorbles", "flumph"] and res["query"]["n_unknown"] == 2
    assert res["query"]["tokens"] == ["<start>", "a", "dog", "zorbles", "the", "flumph",
                                      "<end>"]
    assert len(res["results"]) == 10


# ----------------------------------------------------------------------------- the cache

def test_cache_is_used_then_invalidated_by_changed_files(setup, tmp_path, monkeypatch, capsys):
    s = setup
    data = tmp_path / "data"
    shutil.copytree(s.data, data)
    ckpt = tmp_path / "ckpt" / "SGR.pth.tar"
    os.makedirs(ckpt.parent)
    shutil.copy(s.paths["SGR"], ckpt)
    cache = tmp_path / "cache"
    calls = []
    encode = evaluation.encode_data
    monkeypatch.setattr(evaluation, "encode_data",
                        lambda *a, **k: calls.append(1) or encode(*a, **k))
    argv = ["--model_path", str(ckpt), "--data_path", str(data), "--vocab_path", s.vocab,
            "--device", "cpu", "--cache_dir", str(cache), "--topk", "4"]

    def query(*extra):
        n = len(calls)
        out = run_json(argv + list(extra or ["--query", s.captions[3]]), capsys)
        return out, len(calls) - n

    first, encoded = query()
    assert encoded == 1 and first["cached"] is False
    second, encoded = query()
    assert encoded == 0 and second["cached"] is True
    assert second["results"] == first["results"]
    _, encoded = query("--image", "2")  # the other direction from the same entry
    assert encoded == 0
    # a changed checkpoint (other weights): encoded again, other scores
    ck = torch.load(str(ckpt), weights_only=False)
    torch.manual_seed(11)
    ck["model"] = SGRAF(argparse.Namespace(**vars(ck["opt"]), device="cpu")).state_dict()
    torch.save(ck, str(ckpt))
    third, encoded = query()
    assert encoded == 1 and third["results"] != first["results"]
    assert query()[1] == 0
    # a changed feature file, same shape: encoded again, the scores of the new features
    feats = data / "synth_precomp" / "test_ims.npy"
    x = np.load(feats)
    np.save(feats, x[::-1].copy())
    fourth, encoded = query()
    assert encoded == 1 and fourth["results"] != third["results"]
    # a changed caption file: encoded again
    caps = data / "synth_precomp" / "test_caps.txt"
    lines = caps.read_text(encoding="utf-8").splitlines()
    caps.write_text("\n".join(["a dog"] + lines[1:]) + "\n", encoding="utf-8")
    _, encoded = query("--image", "0")
    assert encoded == 1
    assert query("--image", "0")[1] == 0
    # every entry is a directory of this tool's; nothing else in the cache but the digests and
    # the record that they are this tool's
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 4 and sorted(p.name for p in cache.iterdir() if p.is_file()) == \
        [outputs.MARKER, "digests.json"]
    assert outputs.made_by(str(cache / "digests.json")) == "retrieve.py"
    for e in entries:
        assert outputs.made_by(str(e)) == "retrieve.py"


def test_digests_of_unchanged_files_are_remembered(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    d = Digests(str(tmp_path))
    assert d(str(f)) == hashlib.sha256(b"abc").hexdigest()
    d.save()
    reads = []
    sha = outputs.file_digest
    monkeypatch.setattr(outputs, "file_digest", lambda p: reads.append(p) or sha(p))
    d = Digests(str(tmp_path))
    d(str(f))
    assert len(reads) == 1  # changed within RACY_NS of its hashing: hashed again
    d.files[os.path.realpath(f)]["at"] += 10 * RACY_NS  # as if hashed long after
    d(str(f))
    assert len(reads) == 1  # unchanged: remembered
    f.write_bytes(b"abd")
    assert d(str(f)) == hashlib.sha256(b"abd").hexdigest() and len(reads) == 2


# ----------------------------------------------------------------------------- errors

# retrieve.py's refusals: (argv, capsys, key, *fragments), see helpers.expect_exit
expect_exit = partial(helpers.expect_exit, retrieve.main)


def test_errors(setup, tmp_path, capsys):
    s = setup
    expect_exit(args(s, "SGR", "--query", ""), capsys, "query_empty", '--query "": the query '
                'is empty; pass a sentence')
    expect_exit(args(s, "SGR", "--query", "  \t"), capsys, "query_empty")
    expect_exit(args(s, "SGR", "--image", str(N_TEST)), capsys, "image_index",
                "--image 12: the test split has 12 images (indices 0 to 11)")
    expect_exit(args(s, "SGR", "--image", "-1"), capsys, "image_index")
    expect_exit(args(s, "SGR", "--query", "a dog", "--topk", "0"), capsys, "flag_positive")
    # a split without images: no feature file, or a feature file of no images
    data = tmp_path / "data"
    shutil.copytree(s.data, data)
    split = data / "synth_precomp"
    shutil.copy(split / "test_caps.txt", split / "capsonly_caps.txt")
    argv = ["--model_path", s.paths["SGR"], "--data_path", str(data), "--vocab_path", s.vocab,
            "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--query", "a dog"]
    expect_exit(argv + ["--split", "capsonly"], capsys, "split_missing",
                "capsonly_ims.npy not found")
    np.save(split / "empty_ims.npy", np.zeros((0, 36, 32), dtype=np.float32))
    (split / "empty_caps.txt").write_text("")
    expect_exit(argv + ["--split", "empty"], capsys, "features_empty", "holds no images")
    # the cache must not go into the data or checkpoint folders
    expect_exit(args(s, "SGR", "--query", "a dog", cache=os.path.join(s.data, "c")), capsys,
                "cache_inside", "inside the data folder")
    expect_exit(args(s, "SGR", "--query", "a dog",
                     cache=os.path.join(os.path.dirname(s.paths["SGR"]), "c")), capsys,
                "cache_inside", "inside the checkpoint folder")
    assert not os.path.exists(os.path.join(s.data, "c"))


def test_never_writes_over_a_file_it_did_not_make(setup, tmp_path, capsys):
    s = setup
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG my picture")
    expect_exit(args(s, "SGR", "--query", "a dog", "--explain", str(mine)), capsys,
                "file_not_made", "already exists and was not written by retrieve.py")
    assert mine.read_bytes() == b"\x89PNG my picture"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digests.json").write_text('{"mine": 1}')
    expect_exit(args(s, "SGR", "--query", "a dog", cache=cache), capsys, "file_not_made")
    assert (cache / "digests.json").read_text() == '{"mine": 1}'
    # its own picture is replaced
    out = tmp_path / "attention.png"
    run_json(args(s, "SGR", "--query", "a dog", "--explain", str(out), "--topk", "2"), capsys)
    first = out.read_bytes()
    run_json(args(s, "SGR", "--query", "a red car", "--explain", str(out), "--topk", "2"),
             capsys)
    assert out.read_bytes() != first and outputs.made_by(str(out)) == "retrieve.py --explain"


# ----------------------------------------------------------------------------- --explain

def scan_attention_reference(img, cap, smooth):
    """The weights of model.SCAN_attention (the original's op order), (L, R)."""
    attn = torch.bmm(img, cap.transpose(1, 2))                    # (1, R, L)
    attn = l2norm(F.leaky_relu(attn, 0.1), 2)
    return F.softmax(attn.transpose(1, 2) * smooth, dim=2)[0]     # (L, R)


@pytest.mark.parametrize("case", ["SGR", "NAAF", "SGR+NAAF"])
def test_explain_rows_are_the_matchers_attention(setup, case, tmp_path):
    s = setup
    names = CASES[case]
    out = str(tmp_path / "att.png")
    hits = retrieve.retrieve(s.paths[names[0]], query="a little dog on a bench", topk=3,
                             data_path=s.data, vocab_path=s.vocab, device="cpu",
                             model_path2=s.paths[names[1]] if len(names) > 1 else None,
                             cache_dir=str(tmp_path / "cache"), explain=out)
    assert hits["explain"] == out and outputs.made_by(out) == "retrieve.py --explain"
    drawn = hits.context["explain"]["attention"]
    assert len(drawn) == 3 * len(names)
    tokens = hits["query"]["tokens"]
    for w in drawn:
        assert w.shape == (len(tokens), 36)
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-6)  # one row per word
        assert (w >= 0).all()
    # the weights are those of the matcher's own attention, recomputed from the embeddings
    gallery = retrieve.Gallery(s.paths[names[0]], s.data, "test", None, s.vocab, device="cpu",
                               cache_dir=str(tmp_path / "cache"))
    m = gallery.members[0]
    enc = gallery.encodings(m)
    q = m.model.query_batch("a little dog on a bench", m.vocab)
    m.model.val_start()
    with torch.no_grad():
        cap = m.model.forward_text(q.captions, q.lengths)[0]
        for k, r in enumerate(hits["results"]):
            img = torch.from_numpy(np.array(enc.img_embs[r["index"]][None]))
            smooth = 9.0 if names[0] != "NAAF" else m.opt.lambda_softmax
            ref = scan_attention_reference(img, cap, smooth).double().numpy()
            np.testing.assert_allclose(drawn[k * len(names)], ref, rtol=0, atol=1e-6)


def test_explain_image_query_and_regions_on_images(setup, tmp_path):
    """An image query: one heatmap per result caption (its words x the query image's regions);
    with boxes and image files, each word's most attended region is drawn on the image."""
    s = setup
    data = tmp_path / "data"
    shutil.copytree(s.data, data)
    split = data / "synth_precomp"
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    import matplotlib.image as mpimg
    for i in range(N_TEST):
        mpimg.imsave(str(images / ("%d.png" % (1000 + i))), rng.random((40, 60, 3)))
    (split / "test_ids.txt").write_text("".join("%d\n" % (1000 + i) for i in range(N_TEST)))
    xy = rng.uniform(0, 30, (N_TEST, 36, 2))
    np.save(split / "test_ims_bbx.npy", np.concatenate([xy, xy + 10], 2).astype(np.float32))
    out = str(tmp_path / "att.png")
    hits = retrieve.retrieve(s.paths["SAF"], image=4, topk=2, data_path=str(data),
                             vocab_path=s.vocab, device="cpu", cache_dir=None, explain=out,
                             images=str(images))
    drawn = hits.context["explain"]["attention"]
    words = hits.context["explain"]["words"]
    rows = hits.context["explain"]["rows"]
    for r, w, ws, row in zip(hits["results"], drawn, words, rows):
        assert ws == ["<start>"] + tokenize(s.captions[r["index"]]) + ["<end>"]
        assert len(ws) == w.shape[0]
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-6)
        image = row[1]
        assert image["kind"] == "image"
        boxes = np.load(split / "test_ims_bbx.npy")[4]
        for word, weights in zip(ws[1:-1], w[1:-1]):  # its box is that of its top region
            assert any(np.allclose(b[:4], boxes[int(np.argmax(weights))])
                       for b in image["boxes"] if word in b[4].split(", ")), word
        assert len(image["boxes"]) == len({int(np.argmax(x)) for x in w[1:-1]})
    # an id file that does not match the split
    (split / "test_ids.txt").write_text("1000\n")
    with pytest.raises(errors.DataError) as e:
        retrieve.retrieve(s.paths["SAF"], image=4, data_path=str(data), vocab_path=s.vocab,
                          device="cpu", cache_dir=None, explain=str(tmp_path / "b.png"),
                          images=str(images))
    assert e.value.key == "image_ids_count"
    assert not os.path.exists(tmp_path / "b.png")


# ----------------------------------------------------------------------------- any matcher

class GlobalToy(Toy):
    """test_contract's Toy (global embeddings, dot-product scores, no attention), with the
    one hook its text encoder needs: it is not called as txt_enc(captions, lengths)."""
    no_attention_why = "it scores by the dot product of global embeddings"

    def forward_text(self, captions, lengths, **extra):
        return self.forward_emb(torch.zeros(len(captions), 1, self.opt.img_dim), captions,
                                lengths)[1:]


def test_a_matcher_with_global_embeddings_and_no_attention(setup, tmp_path, monkeypatch,
                                                           capsys):
    s = setup
    monkeypatch.setitem(matchers.MATCHERS, "TOY", GlobalToy)
    n_vocab = len(deserialize_vocab(os.path.join(s.vocab, "synth_precomp_vocab.json")))
    opt = argparse.Namespace(**dict(vars(original_opt("TOY", n_vocab)), workers=0))
    torch.manual_seed(3)
    toy = GlobalToy(argparse.Namespace(**vars(opt), device="cpu"))
    path = str(tmp_path / "ckpt" / "toy.pth.tar")
    os.makedirs(os.path.dirname(path))
    torch.save({"epoch": 1, "model": toy.state_dict(), "opt": opt, "best_rsum": 0,
                "Eiters": 0}, path)
    sims = str(tmp_path / "toy.npy")
    evaluation.main(["--model_path", path, "--data_path", s.data, "--vocab_path", s.vocab,
                     "--split", "test", "--device", "cpu", "--save_sims", sims])
    sims = np.load(sims)
    base = ["--model_path", path, "--data_path", s.data, "--vocab_path", s.vocab, "--device",
            "cpu", "--cache_dir", str(tmp_path / "cache"), "--topk", "6"]
    for _ in range(2):  # encoded, then from the cache
        out = run_json(base + ["--query", s.captions[8]], capsys)
        assert_same_ranking(out["results"], sims[:, 8], 6)
        out = run_json(base + ["--image", "5"], capsys)
        assert_same_ranking(out["results"], sims[5], 6)
    assert out["cached"] is True
    expect_exit(base + ["--query", "a dog", "--explain", str(tmp_path / "t.png")], capsys,
                "explain_unsupported", "--explain: TOY has no word x region attention to show: "
                "it scores by the dot product of global embeddings; drop --explain")


def test_the_contract_hooks_have_defaults():
    """A matcher that adds nothing gets the SCAN tokenisation and text encoder call, and an
    --explain refusal that names it."""
    for name in ("query_batch", "forward_text", "word_region_attention"):
        assert callable(getattr(contract.Matcher, name))
    assert contract.Matcher.attention_info is None
    assert SGRAF.attention_info and naaf.NAAF.attention_info


# ----------------------------------------------------------------------------- --plots

@pytest.mark.parametrize("case", ["SGR", "SGR+NAAF"])
def test_plots_recall_curve_is_the_printed_recall(setup, case, tmp_path, capsys):
    s = setup
    names = CASES[case]
    out_dir = tmp_path / "plots"
    argv = ["--model_path", s.paths[names[0]], "--data_path", s.data, "--vocab_path", s.vocab,
            "--split", "test", "--device", "cpu", "--plots", str(out_dir)] + \
        (["--model_path2", s.paths[names[1]]] if len(names) > 1 else [])
    capsys.readouterr()
    evaluation.main(argv)
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted(plots.EVAL_FILES + (outputs.MARKER,))
    for name in plots.EVAL_FILES:
        assert outputs.made_by(str(out_dir / name)) == "evaluation.py --plots"
    # the numbers behind the figures: each model, then the ensemble
    res = evaluation.evalrank(s.paths[names[0]], data_path=s.data, vocab_path=s.vocab,
                              split="test", device="cpu", plots=str(out_dir),
                              model_path2=s.paths[names[1]] if len(names) > 1 else None)
    curves = res["plot_data"]
    assert len(curves) == (1 if len(names) == 1 else 3)
    ens = list(curves.values())[-1]
    i2t_line = re.search(r"^Image to text: (.*)$", printed, re.M).group(1).split()
    t2i_line = re.search(r"^Text to image: (.*)$", printed, re.M).group(1).split()
    for way, r, line in (("i2t", res["i2t"], i2t_line), ("t2i", res["t2i"], t2i_line)):
        rec = ens["recall_" + way]
        assert len(rec) == 100 and list(ens["k"][[0, 4, 9]]) == [1, 5, 10]
        assert [rec[0], rec[4], rec[9]] == list(r[:3])                # to the last bit
        assert ["%.1f" % v for v in (rec[0], rec[4], rec[9])] == line[:3]  # as printed
        assert np.floor(np.median(ens["ranks_" + way])) + 1 == r[3]   # medr
        assert (np.diff(rec) >= 0).all() and rec[-1] == 100.0
    n_img, n_cap = s.sims["SGR"].shape
    for d in curves.values():
        assert d["pos_hist"].sum() == n_cap and d["neg_hist"].sum() == n_img * n_cap - n_cap
    if len(names) > 1:  # each model's own curve is its own matrix's
        for name, d in zip(names, list(curves.values())[:2]):
            r = evaluation.i2t(None, None, None, s.sims[name])
            assert list(d["recall_i2t"][[0, 4, 9]]) == list(r[:3])


def test_plots_never_write_over_a_file_they_did_not_make(setup, tmp_path, capsys):
    s = setup
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    (out_dir / "recall_at_k.png").write_bytes(b"my own figure")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--model_path", s.paths["SGR"], "--data_path", s.data,
                         "--vocab_path", s.vocab, "--split", "test", "--device", "cpu",
                         "--plots", str(out_dir)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "error: %s: already exists and was not written by evaluation.py --plots" % (
        out_dir / "recall_at_k.png") in captured.err
    assert "rsum" not in captured.out  # refused before any compute
    assert sorted(os.listdir(out_dir)) == ["recall_at_k.png"]
    assert (out_dir / "recall_at_k.png").read_bytes() == b"my own figure"


def test_plots_fold5_are_the_means_over_the_folds(tmp_path):
    """COCO 5-fold 1K: the recall curves are the means of the folds' curves, as the printed
    means (to the last bit); scores and ranks are those of the pairs within the folds."""
    rng = np.random.default_rng(0)
    sims = np.zeros((5000, 25000), dtype=np.float32)  # only the folds' blocks are read
    for i in range(5):
        b = rng.random((1000, 5000), dtype=np.float32)
        b[np.arange(5000) // 5, np.arange(5000)] += rng.random(5000, dtype=np.float32) * 0.5
        sims[i * 1000:(i + 1) * 1000, i * 5000:(i + 1) * 5000] = b
    r = evaluation.report(sims, fold5=True, log=lambda *a: None)
    d = evaluation.plot_data(sims, fold5=True)
    assert list(d["recall_i2t"][[0, 4, 9]]) == list(r["i2t"][:3])
    assert list(d["recall_t2i"][[0, 4, 9]]) == list(r["t2i"][:3])
    assert d["pos_hist"].sum() == 25000 and d["neg_hist"].sum() == 5 * 1000 * 5000 - 25000
    assert len(d["ranks_i2t"]) == 5000 and len(d["ranks_t2i"]) == 25000
    assert d["ranks_t2i"].max() < 1000  # ranks within a fold
    paths = plots.evaluation_figures([("SGR (x.pth.tar)", d)], str(tmp_path), "coco testall")
    assert [os.path.basename(p) for p in paths] == list(plots.EVAL_FILES)


# ----------------------------------------------------------------------------- GSMN and HREM

OTHERS = {"GSMN": ("GSMN",), "HREM": ("HREM",), "GSMN+HREM": ("GSMN", "HREM")}
OTHER_FLAGS = {"GSMN": ["--module_name", "GSMN", "--is_sparse", "--num_block", "4",
                        "--feat_dim", "4", "--hid_dim", "8"],
               "HREM": ["--module_name", "HREM", "--bert_path", str(REPO / "bert_demo"),
                        "--bert_init", "random", "--nhead", "4"]}


@pytest.fixture(scope="module")
def others(setup, tmp_path_factory):
    """The split of `setup` with GSMN's optional files (boxes, image sizes, dependency arcs
    without self-loops), checkpoints of a sparse GSMN and of HREM (the demo's BERT, random
    weights) built from the flags, and each case's --save_sims matrix."""
    root = tmp_path_factory.mktemp("retrieve_others")
    data = str(root / "data")
    shutil.copytree(setup.data, data)
    add_gsmn_files(data, "test", N_TEST, 5 * N_TEST)
    arcs = [[[0, 2]] + [[a, b] for a, b in zip(range(1, 4), range(2, 5))]
            for _ in range(5 * N_TEST)]
    with open(os.path.join(data, "synth_precomp", "test_caps.json"), "w") as f:
        json.dump(arcs, f)
    os.makedirs(root / "ckpt")
    paths = {}
    for seed, name in enumerate(OTHER_FLAGS):
        torch.manual_seed(seed)
        paths[name] = save_model_of_flags(str(root / "ckpt" / ("%s.pth.tar" % name)), data,
                                          setup.vocab, str(root / "run"), OTHER_FLAGS[name])
    sims = {}
    for case, names in OTHERS.items():
        f = str(root / ("%s.npy" % case))
        evaluation.main(["--model_path", paths[names[0]], "--data_path", data, "--split",
                         "test", "--device", "cpu", "--save_sims", f] +
                        (["--model_path2", paths[names[1]]] if len(names) > 1 else []))
        sims[case] = np.load(f)
    return argparse.Namespace(root=root, data=data, vocab=setup.vocab, paths=paths, sims=sims,
                              captions=setup.captions)


def other_args(s, case, *extra, cache=None):
    names = OTHERS[case]
    return (["--model_path", s.paths[names[0]], "--data_path", s.data, "--split", "test",
             "--device", "cpu"] +
            (["--model_path2", s.paths[names[1]]] if len(names) > 1 else []) +
            (["--cache_dir", str(cache)] if cache else ["--no_cache"]) + list(extra))


@pytest.mark.parametrize("case", list(OTHERS))
def test_gsmn_and_hrem_queries_equal_the_save_sims_matrix(others, case, tmp_path, capsys,
                                                          monkeypatch):
    """The registry's other matchers with no change in retrieve.py: GSMN (a cross-attention
    matcher with per-image boxes and per-caption arcs), HREM (global embeddings, BERT), and
    an ensemble of the two (two vocabularies). Encoded once, then from the cache."""
    s, sims = others, others.sims[case]
    cache = tmp_path / "cache"
    calls = []
    encode = evaluation.encode_data
    monkeypatch.setattr(evaluation, "encode_data",
                        lambda *a, **k: calls.append(1) or encode(*a, **k))
    for j in (0, 31, 59):
        out = run_json(other_args(s, case, "--query", s.captions[j], "--topk", "5",
                                  cache=cache), capsys)
        assert_same_ranking(out["results"], sims[:, j], 5)
    assert len(calls) == len(OTHERS[case]) and out["cached"] is True
    for i in (0, 7):
        out = run_json(other_args(s, case, "--image", str(i), "--topk", "6", cache=cache),
                       capsys)
        assert_same_ranking(out["results"], sims[i], 6)
        assert out["query"]["captions"] == s.captions[5 * i:5 * i + 5]
    assert len(calls) == len(OTHERS[case])


def test_hrem_query_tokens_unknown_words_and_no_explain(others, tmp_path, capsys):
    s = others
    capsys.readouterr()
    assert retrieve.main(other_args(s, "HREM", "--query", "A dog zorbles the Flumph",
                                    "--topk", "2")) == 0
    assert 'query: "A dog zorbles the Flumph" (5 words; 2 not in the vocabulary, mapped to ' \
           '<unk>: zorbles, flumph)' in capsys.readouterr().out
    res = run_json(other_args(s, "HREM", "--query", "a dog runs"), capsys)
    assert res["query"]["tokens"] == ["[CLS]", "a", "dog", "runs", "[SEP]"]
    assert res["query"]["n_words"] == 3 and res["query"]["unknown"] == []
    expect_exit(other_args(s, "HREM", "--query", "a dog", "--explain",
                           str(tmp_path / "x.png")), capsys, "explain_unsupported",
                "--explain: HREM has no word x region attention to show: it is a dual "
                "encoder")
    assert not os.path.exists(tmp_path / "x.png")
    expect_exit(other_args(s, "HREM", "--query", "a dog", "--vocab_path", s.vocab), capsys,
                "flag_unsupported", "WordPiece vocabulary of --bert_path")


@pytest.mark.parametrize("case", ["GSMN", "GSMN+HREM"])
def test_gsmn_explain_rows_are_its_text_to_image_attention(others, case, tmp_path):
    """GSMN draws its textual graph's attention (each word over the regions); in an ensemble
    with HREM only GSMN's maps are drawn, and the title says why HREM has none."""
    s = others
    names = OTHERS[case]
    out = str(tmp_path / "att.png")
    hits = retrieve.retrieve(s.paths[names[0]], query="a little dog on a bench", topk=3,
                             data_path=s.data, device="cpu", cache_dir=None, explain=out,
                             model_path2=s.paths[names[1]] if len(names) > 1 else None)
    drawn = hits.context["explain"]["attention"]
    assert len(drawn) == 3 and outputs.made_by(out) == "retrieve.py --explain"
    gallery = retrieve.Gallery(s.paths["GSMN"], s.data, "test", device="cpu", cache_dir=None)
    m = gallery.members[0]
    enc = gallery.encodings(m)
    q = m.model.query_batch("a little dog on a bench", m.vocab)
    assert q.extra == {"depends": [None]}
    with torch.no_grad():
        cap = m.model.forward_text(q.captions, q.lengths)[0]
        for k, r in enumerate(hits["results"]):
            w = drawn[k]
            assert w.shape == (len(q.tokens), 36)
            np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-6)
            img = torch.from_numpy(np.array(enc.img_embs[r["index"]][None]))
            ref = scan_attention_reference(img, cap, m.opt.lambda_softmax).double().numpy()
            np.testing.assert_allclose(w, ref, rtol=0, atol=1e-6)
    hits = retrieve.retrieve(s.paths["GSMN"], image=3, topk=2, data_path=s.data, device="cpu",
                             cache_dir=None, explain=str(tmp_path / "img.png"))
    for r, w, ws in zip(hits["results"], hits.context["explain"]["attention"],
                        hits.context["explain"]["words"]):
        assert ws == ["<start>"] + tokenize(s.captions[r["index"]]) + ["<end>"]
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-6)


def test_plots_of_gsmn_and_hrem(others, tmp_path, capsys):
    s = others
    capsys.readouterr()
    res = evaluation.evalrank(s.paths["GSMN"], model_path2=s.paths["HREM"], data_path=s.data,
                              split="test", device="cpu", plots=str(tmp_path / "p"))
    assert sorted(os.listdir(tmp_path / "p")) == sorted(plots.EVAL_FILES + (outputs.MARKER,))
    ens = list(res["plot_data"].values())
    assert len(ens) == 3
    assert list(ens[-1]["recall_t2i"][[0, 4, 9]]) == list(res["t2i"][:3])
    assert list(ens[-1]["recall_i2t"][[0, 4, 9]]) == list(res["i2t"][:3])
