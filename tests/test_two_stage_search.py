"""Two-stage retrieval in retrieve.py (issue 23): a text query's results are its exhaustive
ranking (the re-ranker's --save_sims column) restricted to the shortlist's top K (the dual
encoder's --save_sims column), re-ordered by the re-ranker's scores, then the shortlist's next
items in its order; an image query likewise over the captions; an ensemble re-ranks by the mean;
the approximate indexes report their recall; the refusals are one line and write nothing. And
index.py: the exact top K (float32 pass, float64 re-scoring) is numpy's argsort order, HNSW's
recall against it, the gallery store resumes a killed build and refuses another gallery."""
import argparse
import json
import logging
import os

import numpy as np
import pytest
import torch

import evaluation
import index
import matchers
import opts
import retrieve
from conftest import REPO
from helpers import expect_exit, tiny_dataset, train_args
from model import SGRAF
from test_eval_cli import original_opt
from vocab import deserialize_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEST = 12  # images of the test split (60 captions)
HREM_FLAGS = ["--module_name", "HREM", "--bert_path", str(REPO / "bert_demo"),
              "--bert_init", "random", "--nhead", "4"]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    """A tiny split; SGR and SAF (original format) and HREM checkpoints; the --save_sims
    matrices of SGR, of SGR+SAF and of HREM."""
    root = tmp_path_factory.mktemp("two_stage")
    data, vocab = tiny_dataset(str(root), n_train=5, n_dev=4, n_test=N_TEST)
    n_vocab = len(deserialize_vocab(os.path.join(vocab, "synth_precomp_vocab.json")))
    os.makedirs(root / "ckpt")
    paths = {}
    for seed, name in enumerate(["SGR", "SAF"]):
        torch.manual_seed(seed)
        opt = original_opt(name, n_vocab)
        opt.workers = 0
        m = SGRAF(argparse.Namespace(**vars(opt), device="cpu"))
        paths[name] = str(root / "ckpt" / ("%s.pth.tar" % name))
        torch.save({"epoch": 1, "model": m.state_dict(), "best_rsum": 0.0, "opt": opt,
                    "Eiters": 1}, paths[name])
    torch.manual_seed(5)
    opt = opts.parse_opt(train_args(data, vocab, str(root / "run"), *HREM_FLAGS))
    opt.device, opt.workers = "cpu", 0
    opt.vocab_size = len(matchers.matcher_class("HREM").vocabulary(opt)[0])
    m = matchers.build_model(opt)
    paths["HREM"] = str(root / "ckpt" / "HREM.pth.tar")
    torch.save({"epoch": 1, "model": m.state_dict(), "best_rsum": 0.0, "opt": opt,
                "Eiters": 1}, paths["HREM"])
    opt.data_name = "other_precomp"  # the shortlist of another dataset
    paths["HREM_other"] = str(root / "ckpt" / "HREM_other.pth.tar")
    torch.save({"epoch": 1, "model": m.state_dict(), "best_rsum": 0.0, "opt": opt,
                "Eiters": 1}, paths["HREM_other"])
    sims = {}
    for case, names in {"SGR": ["SGR"], "SGR+SAF": ["SGR", "SAF"], "HREM": ["HREM"]}.items():
        f = str(root / ("%s.npy" % case))
        evaluation.main(["--model_path", paths[names[0]], "--data_path", data, "--split",
                         "test", "--device", "cpu", "--save_sims", f] +
                        ([] if case == "HREM" else ["--vocab_path", vocab]) +
                        (["--model_path2", paths[names[1]]] if len(names) > 1 else []))
        sims[case] = np.load(f)
    captions = open(os.path.join(data, "synth_precomp", "test_caps.txt"),
                    encoding="utf-8").read().splitlines()
    return argparse.Namespace(root=root, data=data, vocab=vocab, paths=paths, sims=sims,
                              captions=captions)


def argv(s, *extra, case="SGR", shortlist="HREM", k=4, cache=None):
    names = case.split("+")
    return (["--model_path", s.paths[names[0]], "--data_path", s.data, "--vocab_path",
             s.vocab, "--split", "test", "--device", "cpu"] +
            (["--model_path2", s.paths[names[1]]] if len(names) > 1 else []) +
            (["--shortlist", s.paths[shortlist]] if shortlist else []) +
            (["--rerank_k", str(k)] if k is not None else []) +
            (["--cache_dir", str(cache)] if cache else ["--no_cache"]) + list(extra))


def run_json(args, capsys):
    capsys.readouterr()
    assert retrieve.main(args + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_two_stage(results, rerank, short, k, topk):
    """results: the shortlist's top k (`short`, a --save_sims column or row, in the order
    np.argsort(...)[::-1]) ordered by `rerank` (the re-ranker's exhaustive scores, 1e-6; equal
    ones the lower index first, as the exhaustive search), then the shortlist's next ones with
    its scores."""
    sl_order = np.argsort(short)[::-1]
    top = np.sort(sl_order[:k])  # in gallery order, ordered as the exhaustive search orders
    want = top[np.argsort(-rerank[top], kind="stable")]
    got = [r["index"] for r in results]
    assert got[:k] == want.tolist() and got[k:] == sl_order[k:topk].tolist()
    np.testing.assert_allclose([r["score"] for r in results[:k]], rerank[want], rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose([r["shortlist_score"] for r in results[:k]], short[want],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["score"] for r in results[k:]], short[sl_order[k:topk]],
                               rtol=0, atol=1e-6)
    assert [r["stage"] for r in results] == ["rerank"] * k + ["shortlist"] * (topk - k)
    assert [r["rank"] for r in results] == list(range(1, topk + 1))


@pytest.mark.parametrize("case", ["SGR", "SGR+SAF"])
def test_queries_are_the_exhaustive_ranking_restricted_to_the_shortlist(s, case, tmp_path,
                                                                       capsys):
    cache = tmp_path / "cache"
    for j in (0, 23, 59):
        out = run_json(argv(s, "--query", s.captions[j], "--topk", "7", case=case,
                            cache=cache), capsys)
        assert_two_stage(out["results"], s.sims[case][:, j], s.sims["HREM"][:, j], 4, 7)
        assert out["two_stage"] == {
            "shortlist": s.paths["HREM"], "shortlist_matcher": "HREM", "rerank_k": 4,
            "reranked": 4, "index": "flat", "index_params": {}, "index_recall": None}
        assert out["n_gallery"] == N_TEST
    for i in (0, 11):
        out = run_json(argv(s, "--image", str(i), "--topk", "9", "--rerank_k", "6",
                            case=case, cache=cache), capsys)
        assert_two_stage(out["results"], s.sims[case][i], s.sims["HREM"][i], 6, 9)
        assert out["results"][0]["text"] == s.captions[out["results"][0]["index"]]
    assert out["cached"] is True  # the shortlist's encodings are cached with the others'
    # exhaustive: unchanged results, each marked as such
    out = run_json(argv(s, "--query", s.captions[5], "--topk", "3", shortlist=None, k=None),
                   capsys)
    assert out["two_stage"] is None and {r["stage"] for r in out["results"]} == {"exhaustive"}
    assert [r["index"] for r in out["results"]] == \
        np.argsort(-s.sims["SGR"][:, 5], kind="stable")[:3].tolist()


def test_table_says_two_stage_and_k_past_the_gallery_is_stated(s, capsys, caplog):
    capsys.readouterr()
    assert retrieve.main(argv(s, "--query", s.captions[3], "--topk", "6")) == 0
    out = capsys.readouterr().out
    assert "two-stage: the top 4 images by the shortlist (HREM, flat index) re-ranked" in out
    rows = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [("~" in line.split()[2]) for line in rows] == [False] * 4 + [True] * 2
    caplog.set_level(logging.WARNING)
    hits = retrieve.retrieve(s.paths["SGR"], query=s.captions[3], topk=N_TEST,
                             data_path=s.data, vocab_path=s.vocab, device="cpu",
                             cache_dir=None, shortlist=s.paths["HREM"], rerank_k=50)
    assert "--rerank_k 50: K = 50 is at least the gallery of text to image (12 images)" \
        in caplog.text
    assert hits["two_stage"]["reranked"] == N_TEST
    # all of them re-ranked: the exhaustive ranking
    assert [r["index"] for r in hits["results"]] == \
        np.argsort(-s.sims["SGR"][:, 3], kind="stable").tolist()
    assert "this is the exhaustive ranking" in retrieve.format_table(hits)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_report_their_recall(s, kind, capsys):
    out = run_json(argv(s, "--query", s.captions[8], "--topk", "5", "--index", kind),
                   capsys)
    ts = out["two_stage"]
    assert ts["index"] == kind and ts["index_recall"] == 1.0  # 12 vectors: found exactly
    assert_two_stage(out["results"], s.sims["SGR"][:, 8], s.sims["HREM"][:, 8], 4, 5)
    capsys.readouterr()
    assert retrieve.main(argv(s, "--query", s.captions[8], "--index", kind)) == 0
    assert "%s index, approximate: recall@4 1.000 against flat" % kind in \
        capsys.readouterr().out


def test_refusals_are_one_line_and_write_nothing(s, tmp_path, capsys):
    cache = tmp_path / "cache"
    q = ["--query", "a dog"]
    expect_exit(retrieve.main, argv(s, *q, shortlist=None, cache=cache), capsys,
                "rerank_needs_shortlist", "--rerank_k 4: ", root=tmp_path, new_allowed=False)
    expect_exit(retrieve.main, argv(s, *q, k=None, cache=cache), capsys,
                "shortlist_needs_k", "--shortlist ", root=tmp_path, new_allowed=False)
    expect_exit(retrieve.main, argv(s, *q, k=0, cache=cache), capsys, "flag_positive",
                "--rerank_k 0: must be a positive integer", root=tmp_path, new_allowed=False)
    expect_exit(retrieve.main, argv(s, *q, shortlist="SAF", cache=cache), capsys,
                "shortlist_unsupported", "SAF cannot shortlist: it scores each",
                root=tmp_path, new_allowed=False)
    expect_exit(retrieve.main, argv(s, *q, shortlist="HREM_other", cache=cache), capsys,
                "shortlist_split", "other_precomp, the re-ranker reads", root=tmp_path,
                new_allowed=False)
    expect_exit(retrieve.main, argv(s, *q, "--index", "hnsw", shortlist=None, k=None,
                                    cache=cache), capsys, "flag_unsupported",
                "--index hnsw: does not apply to the exhaustive search", root=tmp_path,
                new_allowed=False)


# ----------------------------------------------------------------------------- index.py

def test_exact_top_k_is_argsort_order_ties_included():
    """Small integers: every dot product is exact in float32 and float64, with many ties (the
    higher index first, as np.argsort(...)[::-1] of a stable sort); then real vectors."""
    rng = np.random.default_rng(0)
    ints = rng.integers(-3, 4, size=(3000, 16)).astype(np.float32)
    real = rng.standard_normal((3000, 64)).astype(np.float32)
    real[1500:1700] *= 1e-4              # many near-equal small scores
    for vecs, q in ((ints, ints[7]), (ints, ints[100] + 1), (real, real[100] + 0.01),
                    (real, rng.standard_normal(64))):
        q = np.asarray(q, np.float32)
        full = vecs.astype(np.float64) @ q.astype(np.float64)
        want = np.argsort(full, kind="stable")[::-1]
        for k in (1, 10, 257, 3000, 5000):
            ids, scores = index.top_k_exact(vecs, q, k)
            assert ids.tolist() == want[:k].tolist()
            np.testing.assert_allclose(scores, full[want[:k]], rtol=0, atol=1e-12)


def test_hnsw_recall_and_ivf_against_flat():
    rng = np.random.default_rng(1)  # clustered, as embeddings are (IVF's lists are clusters)
    centers = rng.standard_normal((40, 32))
    vecs = (centers[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, 32)))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    flat = index.ShortlistIndex(vecs, "flat", progress=False)
    for kind in ("hnsw", "ivf"):
        ann = index.ShortlistIndex(vecs, kind, progress=False)
        recalls = [ann.recall(q, 50) for q in vecs[:20] + 0.1]
        assert np.mean(recalls) >= 0.9, (kind, recalls)
        ids, scores = ann.search(vecs[3], 50)
        np.testing.assert_allclose(scores, vecs[ids].astype(np.float64) @ vecs[3], atol=1e-12)
        assert np.all(np.diff(scores) <= 0)
    assert flat.recall(vecs[0], 10) == 1.0
    with pytest.raises(Exception) as e:
        index.ShortlistIndex(vecs, "lsh")
    assert "--index lsh: unknown lsh" in str(e.value)


def test_gallery_store_resumes_a_killed_build_and_refuses_another(tmp_path):
    rng = np.random.default_rng(2)
    regions = rng.standard_normal((23, 3, 4)).astype(np.float32)
    calls = []

    def encode(a, b, fail_at=None):
        calls.append(a)
        if a == fail_at:
            raise KeyboardInterrupt
        return {"regions": regions[a:b], "vectors": regions[a:b, 0] * 2}

    root = str(tmp_path / "store")
    ident = {"model": "x", "n": 23}
    with pytest.raises(KeyboardInterrupt):  # killed in its first chunk: nothing recorded
        index.GalleryStore.build(root, 23, lambda a, b: encode(a, b, fail_at=0), ident,
                                 chunk=5, progress=False)
    assert not os.path.exists(os.path.join(root, "store.json"))
    with pytest.raises(KeyboardInterrupt):
        index.GalleryStore.build(root, 23, lambda a, b: encode(a, b, fail_at=15), ident,
                                 chunk=5, dtypes={"regions": "float16"}, progress=False)
    assert index.GalleryStore(root).meta["done"] == 15
    calls.clear()
    store = index.GalleryStore.build(root, 23, encode, ident, chunk=5,
                                     dtypes={"regions": "float16"}, progress=False)
    assert calls == [15, 20] and store.complete  # continued, not restarted
    assert store.array("regions").dtype == np.float16
    np.testing.assert_array_equal(store.array("regions"), regions.astype(np.float16))
    np.testing.assert_array_equal(store.array("vectors"), regions[:, 0] * 2)
    with pytest.raises(Exception) as e:
        index.GalleryStore.build(root, 23, encode, {"model": "y", "n": 23}, chunk=5,
                                 progress=False)
    assert e.value.key == "output_other_run"
    os.makedirs(tmp_path / "mine")
    with pytest.raises(Exception) as e:
        index.GalleryStore.build(str(tmp_path / "mine"), 23, encode, ident, progress=False)
    assert e.value.key == "file_not_made"


# ----------------------------------------------------------------------------- bench.py

def test_bench_two_stage_jobs_at_tiny_sizes(tmp_path, monkeypatch):
    """bench.py --what two_stage's jobs in this process: the rates are measured, the synthetic
    gallery is stored (two chunks) and queried, HNSW's recall is against flat, and float16
    regions score within 1e-3 of float32's."""
    import bench_two_stage
    from test_bench import tiny_args
    args = tiny_args("--what", "two_stage", "--modules", "SGR", "--big_gallery", "700",
                     "--store", str(tmp_path / "store"))
    args.min_len = 4  # [CLS] and [SEP] and words
    # evaluation.py --shortlist's scoring timed on 20 and 30 images (--quick: a tenth)
    monkeypatch.setattr(bench_two_stage, "SIZES", (("Flickr30K 1K", 200), ("COCO 5K", 300)))
    r = bench_two_stage.job_eval(args, "SGR")
    assert r["block_rate"] > 0 and r["short_rate"] > 0 and r["per"] == 6 * args.rerank_k
    assert r["s_cap"] > 0 and r["r_img"] > 0 and str(r["sl_label"]).startswith("HREM")
    rate, n_pairs, n_units, pre = r["ev_1"]  # 30 images x 150 captions, K 16 both ways
    assert rate > 0 and 0 < n_pairs <= 180 * 16 and n_units >= 1 and pre > 0
    rows = bench_two_stage.report_eval("SGR", args, r)
    assert [row[0] for row in rows] == ["Flickr30K 1K", "COCO 5K"]
    b = bench_two_stage.build_store(args, "SGR", args.store)
    store = index.GalleryStore(args.store)
    assert store.complete and store.meta["n"] == 700 and b["t_hnsw"] > 0
    assert store.array("regions").dtype == np.float16
    assert set(store.meta["arrays"]) == {"vectors", "regions", "img_glo"}
    q = bench_two_stage.job_query(args, "SGR")
    assert q["n"] == 700 and 0.9 <= q["recall"] <= 1.0 and q["f16_diff"] < 1e-3
    assert q["flat_best"] > 0 and q["hnsw_best"] > 0


def test_gsmn_reranks_with_its_per_image_and_per_caption_inputs(s, tmp_path_factory, capsys):
    """GSMN (boxes per image, arcs per caption: the score inputs of the shortlisted rows),
    embed_size 64 (at 16, its 1-d chunks make the scores ill-conditioned), re-ranking HREM's
    shortlist, equals its exhaustive ranking restricted to the shortlist."""
    import shutil
    from test_gsmn_integration import add_gsmn_files
    root = tmp_path_factory.mktemp("two_stage_gsmn")
    data = str(root / "data")
    shutil.copytree(s.data, data)
    add_gsmn_files(data, "test", N_TEST, 5 * N_TEST)
    arcs = [[[0, 2]] + [[a, b] for a, b in zip(range(1, 4), range(2, 5))]
            for _ in range(5 * N_TEST)]  # no self-loop: a free-text query scores alike
    with open(os.path.join(data, "synth_precomp", "test_caps.json"), "w") as f:
        json.dump(arcs, f)
    torch.manual_seed(3)
    opt = opts.parse_opt(train_args(data, s.vocab, str(root / "run"), "--module_name", "GSMN",
                                    "--is_sparse", "--num_block", "4", "--feat_dim", "4",
                                    "--hid_dim", "8", "--embed_size", "64"))
    opt.device, opt.workers = "cpu", 0
    opt.vocab_size = len(matchers.matcher_class("GSMN").vocabulary(opt)[0])
    path = str(root / "GSMN.pth.tar")
    torch.save({"epoch": 1, "model": matchers.build_model(opt).state_dict(),
                "best_rsum": 0.0, "opt": opt, "Eiters": 1}, path)
    f = str(root / "GSMN.npy")
    evaluation.main(["--model_path", path, "--data_path", data, "--split", "test", "--device",
                     "cpu", "--save_sims", f])
    sims = np.load(f)
    base = ["--model_path", path, "--data_path", data, "--split", "test", "--device", "cpu",
            "--shortlist", s.paths["HREM"], "--rerank_k", "5", "--no_cache", "--topk", "7"]
    for j in (4, 41):
        out = run_json(base + ["--query", s.captions[j]], capsys)
        assert_two_stage(out["results"], sims[:, j], s.sims["HREM"][:, j], 5, 7)
    out = run_json(base + ["--image", "3"], capsys)
    assert_two_stage(out["results"], sims[3], s.sims["HREM"][3], 5, 7)
