"""serve.py, the search page and HTTP API, against a real uvicorn server on 127.0.0.1 (a free
port each): /api/search and /api/image answer what `retrieve.py --json` prints (SGR, NAAF,
GSMN, HREM, an ensemble; two-stage once retrieve.Gallery has it), /api/failures the ranks that
the evaluation computes from the same matrix (from --sims or scored at start-up), the safety
cases (each a one-line 4xx, or escaped; the server up; no file written), and `python serve.py`
as a process: under 32 concurrent clients (same answers, bounded time, flat memory), then
stopped by SIGTERM within 5 s, its port free."""
import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch

import errors
import evaluation
import matchers
import naaf
import opts
import ranking
import retrieve
import serve
from conftest import REPO
from helpers import (assert_unchanged, expect_exit, save_model_of_flags, snapshot, train_args,
                     tiny_dataset)
from model import SGRAF
from test_eval_cli import original_opt
from test_gsmn_integration import add_gsmn_files
from test_naaf_integration import original_naaf_opt
from test_search_and_pictures import OTHER_FLAGS
from vocab import deserialize_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEST = 12  # images of the tiny split (60 captions)
CASES = {"SGR": ("SGR",), "NAAF": ("NAAF",), "GSMN": ("GSMN",), "HREM": ("HREM",),
         "SGR+NAAF": ("SGR", "NAAF")}
TIMEOUT = httpx.Timeout(30.0)
ERROR_LIMIT = 300


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread for the fixtures (they run before a test's `one_thread`): tiny tensors,
    and a machine that other jobs load (where two spinning threads are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    with one_torch_thread():
        return make_tiny(tmp_path_factory)


def make_tiny(tmp_path_factory):
    """A tiny split (with GSMN's boxes, sizes and arcs, and image files), checkpoints of SGR,
    NAAF (original format), GSMN and HREM (from the flags), and SGR's --save_sims matrix."""
    root = tmp_path_factory.mktemp("serve")
    data, vocab = tiny_dataset(str(root), n_train=5, n_dev=4, n_test=N_TEST)
    add_gsmn_files(data, "test", N_TEST, 5 * N_TEST)
    images = root / "images"
    images.mkdir()
    import matplotlib.image
    for i in range(N_TEST):
        matplotlib.image.imsave(images / ("im%d.png" % i), np.full((40, 60), i, float))
    (root / "ids.txt").write_text("".join("im%d.png\n" % i for i in range(N_TEST)))
    n_vocab = len(deserialize_vocab(os.path.join(vocab, "synth_precomp_vocab.json")))
    (root / "ckpt").mkdir()
    paths = {}
    for seed, name in enumerate(["SGR", "NAAF", "GSMN", "HREM"]):
        torch.manual_seed(seed)
        if name in ("SGR", "NAAF"):
            opt = original_naaf_opt(n_vocab) if name == "NAAF" else original_opt(name, n_vocab)
            opt.workers = 0
            m = (naaf.NAAF if name == "NAAF" else SGRAF)(
                argparse.Namespace(**vars(opt), device="cpu"))
            paths[name] = str(root / "ckpt" / ("%s.pth.tar" % name))
            torch.save({"epoch": 1, "model": m.state_dict(), "best_rsum": 0.0, "opt": opt,
                        "Eiters": 1}, paths[name])
        else:
            paths[name] = save_model_of_flags(str(root / "ckpt" / ("%s.pth.tar" % name)), data,
                                              vocab, str(root / "run"), OTHER_FLAGS[name])
    sims = str(root / "SGR.npy")
    evaluation.main(["--model_path", paths["SGR"], "--data_path", data, "--vocab_path", vocab,
                     "--split", "test", "--device", "cpu", "--save_sims", sims])
    captions = open(os.path.join(data, "synth_precomp", "test_caps.txt"),
                    encoding="utf-8").read().splitlines()
    return argparse.Namespace(root=root, data=data, vocab=vocab, paths=paths, sims=sims,
                              captions=captions, images=str(images), ids=str(root / "ids.txt"))


def flags(s, case, *extra):
    names = CASES[case]
    return (["--model_path", s.paths[names[0]], "--data_path", s.data, "--split", "test",
             "--device", "cpu", "--no_cache"] +
            (["--vocab_path", s.vocab] if "HREM" not in names else []) +
            (["--model_path2", s.paths[names[1]]] if len(names) > 1 else []) + list(extra))


@contextlib.contextmanager
def serving(argv):
    """serve.py's app for argv, on a real uvicorn server in a thread (127.0.0.1, a free port):
    an httpx client of it."""
    import uvicorn
    p = serve.build_parser()
    args = p.parse_args(argv + ["--workers", "2"])
    with one_torch_thread():
        service = serve.build_service(p, args)
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(serve.make_app(service), http="h11",
                                           h11_max_incomplete_event_size=serve.MAX_REQUEST_HEAD,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    base = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
            client.service = service
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def sgr(tiny):
    """The SGR gallery served, with image files and the --sims matrix."""
    with serving(flags(tiny, "SGR", "--images", tiny.images, "--image_ids", tiny.ids,
                       "--sims", tiny.sims)) as client:
        yield client


def retrieve_json(argv, capsys):
    capsys.readouterr()
    assert retrieve.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_answer(got, ref):
    """The same object, every score within 1e-6 (and nothing else different)."""
    assert [r["index"] for r in got["results"]] == [r["index"] for r in ref["results"]]
    np.testing.assert_allclose([r["score"] for r in got["results"]],
                               [r["score"] for r in ref["results"]], rtol=0, atol=1e-6)
    strip = lambda h: dict(h, results=[{k: v for k, v in r.items() if k != "score"}  # noqa
                                       for r in h["results"]])
    assert strip(got) == strip(ref)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", list(CASES))
def test_search_and_image_answer_what_retrieve_json_prints(tiny, case, capsys):
    with serving(flags(tiny, case)) as client:
        for q, k in ((tiny.captions[17], 5), ("a dog zorbles on the grass", N_TEST)):
            got = client.get("/api/search", params={"q": q, "k": k})
            assert got.status_code == 200, got.text
            ref = retrieve_json(flags(tiny, case, "--query", q, "--topk", str(k)), capsys)
            assert_same_answer(got.json(), ref)
        got = client.get("/api/image/3", params={"k": 7})
        assert got.status_code == 200, got.text
        assert_same_answer(got.json(), retrieve_json(flags(tiny, case, "--image", "3",
                                                           "--topk", "7"), capsys))
        for r in got.json()["results"]:
            assert r.get("stage", "exhaustive") == "exhaustive"
        assert_concurrent_answers_equal(client, tiny.captions[:6])


def assert_concurrent_answers_equal(client, queries):
    """The matcher scores from several worker threads at once: each answer is the one it gets
    alone (its models are shared, read-only)."""
    from concurrent.futures import ThreadPoolExecutor
    paths = ([("/api/search", {"q": q, "k": 4}) for q in queries] +
             [("/api/image/%d" % i, {"k": 4}) for i in range(4)])
    alone = [client.get(p, params=kw).json() for p, kw in paths]
    base = str(client.base_url)

    def get(job):
        with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
            return c.get(job[0], params=job[1]).json()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(get, paths * 3))
    assert together == alone * 3


def test_two_stage_answers_what_retrieve_json_prints(tiny, capsys):
    two = ["--shortlist", tiny.paths["HREM"], "--rerank_k", "4"]
    with serving(flags(tiny, "SGR", *two)) as client:
        for q in (tiny.captions[5], "a dog runs"):
            got = client.get("/api/search", params={"q": q, "k": 6})
            assert got.status_code == 200, got.text
            ref = retrieve_json(flags(tiny, "SGR", *two, "--query", q, "--topk", "6"), capsys)
            assert_same_answer(got.json(), ref)
            assert got.json()["two_stage"] is not None
            assert {r["stage"] for r in got.json()["results"]} <= {"rerank", "shortlist"}
        assert client.get("/api/health").json()["two_stage"] == {
            "shortlist": tiny.paths["HREM"], "rerank_k": 4, "index": "flat"}


# ----------------------------------------------------------------------------- failures

def check_failures(client, sims):
    for way, fn in (("t2i", ranking.t2i), ("i2t", ranking.i2t)):
        _, (ranks, _) = fn(None, None, None, sims, return_ranks=True)
        res = client.get("/api/failures", params={"direction": way, "n": len(ranks)}).json()
        got = res["failures"]
        assert len(got) == len(ranks) and res["n_queries"] == len(ranks)
        assert sorted(f["query"] for f in got) == list(range(len(ranks)))
        for f in got:  # the evaluation's 0-based rank + 1, worst first
            assert f["rank"] == ranks[f["query"]] + 1
        assert [f["rank"] for f in got] == sorted((f["rank"] for f in got), reverse=True)
        for f in got[:5]:
            row = sims[:, f["query"]] if way == "t2i" else sims[f["query"]]
            order = np.argsort(row)[::-1]  # the original's order
            assert [a["index"] for a in f["above"]] == \
                order[:min(f["rank"] - 1, serve.ABOVE)].tolist()
            truth = f["image"] if way == "t2i" else f["caption"]
            assert order[f["rank"] - 1] == truth and abs(row[truth] - f["score"]) < 1e-12


def test_failures_are_the_evaluation_ranks_of_the_same_matrix(tiny, sgr):
    sims = np.load(tiny.sims)
    check_failures(sgr, sims)
    assert sgr.get("/api/health").json()["failures"] == "--sims %s" % tiny.sims
    # scored at start-up: the same matrix as the evaluation's, hence the same ranks
    with serving(flags(tiny, "SGR+NAAF")) as client:
        service = client.service
        assert service.failures.source == "scored at start-up"
        ref = np.load(evaluation_sims(tiny, "SGR+NAAF"))
        np.testing.assert_array_equal(service.failures.sims, ref)
        check_failures(client, ref)


def evaluation_sims(s, case):
    names = CASES[case]
    path = str(s.root / ("%s.npy" % case))
    if not os.path.exists(path):
        evaluation.main(["--model_path", s.paths[names[0]], "--data_path", s.data,
                         "--vocab_path", s.vocab, "--split", "test", "--device", "cpu",
                         "--save_sims", path] +
                        (["--model_path2", s.paths[names[1]]] if len(names) > 1 else []))
    return path


def test_sims_of_another_kind_are_refused(tiny, tmp_path, capsys):
    plain = str(tmp_path / "plain.npy")
    np.save(plain, np.load(tiny.sims))
    other = evaluation_sims(tiny, "SGR+NAAF")
    for path, why in ((plain, "no record of evaluation.py --save_sims beside it"),
                      (other, "scored with other checkpoints than --model_path"),
                      (str(tmp_path / "none.npy"), "no such file")):
        expect_exit(serve.main, flags(tiny, "SGR", "--sims", path, "--port", "0"), capsys,
                    "sims_foreign", os.path.basename(path), why)


def test_sims_of_other_flags_are_refused(tiny, sgr):
    with pytest.raises(errors.SGRAFError) as e:
        serve.load_sims(tiny.sims, sgr.service.gallery, {"bert_path": "elsewhere"})
    assert e.value.key == "sims_foreign"
    assert "its matcher flags are none, the server's --bert_path elsewhere" in str(e.value)


def test_command_line_mistakes(tiny, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        expect_exit(serve.main, flags(tiny, "SGR", "--port", str(port)), capsys,
                    "port_unavailable", "--port %d: cannot listen on 127.0.0.1" % port)
    expect_exit(serve.main, flags(tiny, "SGR", "--port", "70000"), capsys, "flag_range")
    expect_exit(serve.main, flags(tiny, "SGR", "--workers", "0"), capsys, "flag_positive")
    expect_exit(serve.main, flags(tiny, "SGR", "--rerank_k", "4"), capsys,
                "rerank_needs_shortlist")


# ----------------------------------------------------------------------------- safety

def raw_get(client, path, headers=None):
    """GET `path` exactly as written (httpx would normalise `..`): (status, body)."""
    url = httpx.URL(str(client.base_url))
    conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def assert_refused(status, body, statuses=(400, 404, 405, 422)):
    assert status in statuses, (status, body[:200])
    line = json.loads(body)["error"]
    assert "\n" not in line and len(line) <= ERROR_LIMIT, line
    return line


def test_safety(tiny, sgr):
    before = snapshot(tiny.root)
    traversal = ["/api/image/..", "/api/image/%2e%2e%2f", "/api/image/..%2f..%2fserve.py",
                 "/api/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file", "/api/image//etc/passwd",
                 "/api/image/%2fetc%2fpasswd/file", "/api/image/../../serve.py/file",
                 "/api/image/1/..%2f..%2fserve.py", "/static/..%2fserve.py",
                 "/static/%2e%2e%2f%2e%2e%2fserve.py", "/static/../../serve.py",
                 "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/%2e%2e%2fserve.py",
                 "/../serve.py", "/static/index.html/..", "/api/failures/..%2f.."]
    for path in traversal:
        status, body = raw_get(sgr, path)
        assert_refused(status, body)
        assert b"import" not in body and b"root:" not in body
    script = "<script>alert(1)</script> & a dog"
    r = sgr.get("/api/search", params={"q": script, "k": 2})
    assert r.status_code == 200 and b"<" not in r.content and b">" not in r.content
    assert b"\\u003cscript\\u003e" in r.content and r.json()["query"]["text"] == script
    assert r.headers["x-content-type-options"] == "nosniff"
    r = sgr.get("/api/search", params={"q": script, "k": "<b>"})
    assert b"<" not in r.content and "\\u003cb\\u003e" in r.text
    assert_refused(r.status_code, r.content)
    big = "/api/search?q=" + "a" * (10 << 20)  # 10 MB (httpx refuses to send it)
    assert assert_refused(*raw_get(sgr, big)).startswith("q: 10485760 characters")
    assert_refused(*raw_get(sgr, "/api/search?q=" + "a" * (serve.MAX_Q + 1)))
    for k in ("0", "-1", str(10 ** 9), "abc", "1.5", "", "%d" % (5 * N_TEST + 1)):
        for path in ("/api/search?q=a+dog&k=", "/api/image/0?k="):
            line = assert_refused(*raw_get(sgr, path + k))
            assert line.startswith("k: ")
    assert_refused(*raw_get(sgr, "/api/search?q=a+dog&k=%d" % (N_TEST + 1)))
    assert sgr.get("/api/search", params={"q": "a dog", "k": N_TEST}).status_code == 200
    assert sgr.get("/api/image/0", params={"k": 5 * N_TEST}).status_code == 200
    for q in ("%ff%fe", "%00", "a%0Ab", "%F0%9F%90%95+dog"):  # bytes, NUL, newline, emoji
        assert raw_get(sgr, "/api/search?k=2&q=" + q)[0] == 200
    for path in ("/api/image/%d" % N_TEST, "/api/image/-1", "/api/image/99/file",
                 "/api/explain?q=a&index=%d" % N_TEST, "/api/image/123456789012345678901234"):
        assert_refused(*raw_get(sgr, path))
    for path in ("/api/search", "/api/search?q=", "/api/search?q=%20%20", "/api/explain?index=1",
                 "/api/explain?q=a+dog", "/api/failures?direction=up",
                 "/api/failures?n=0", "/api/failures?n=%d" % (10 ** 9)):
        assert_refused(*raw_get(sgr, path))
    status, _ = raw_get(sgr, "/api/health", {"Host": "evil.example"})  # DNS rebinding
    assert status == 400
    assert sgr.post("/api/search", params={"q": "a"}).status_code == 405
    assert sgr.get("/api/health").json()["status"] == "ok"
    assert_unchanged(before, tiny.root, new_allowed=False)


def test_page_files_are_served_offline_and_images_by_index(tiny, sgr):
    r = sgr.get("/?q=%3Cscript%3E")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script>" not in r.text.replace('<script src="/static/app.js">', "")
    for name in ("index.html", "app.js", "style.css"):
        text = open(os.path.join(REPO, "static", name), encoding="utf-8").read()
        assert "http://" not in text and "https://" not in text, name  # no CDN
        assert "innerHTML" not in text and "document.write" not in text, name
    assert sgr.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    for i in (0, N_TEST - 1):
        r = sgr.get("/api/image/%d/file" % i)
        assert r.status_code == 200 and r.content == open(
            os.path.join(tiny.images, "im%d.png" % i), "rb").read()
    assert sgr.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/failures"}


def test_explain_is_a_png_and_a_dual_encoder_says_it_has_none(tiny, sgr):
    r = sgr.get("/api/explain", params={"q": "a dog runs", "index": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
    with serving(flags(tiny, "HREM")) as client:
        r = client.get("/api/explain", params={"q": "a dog runs", "index": 3})
        line = assert_refused(r.status_code, r.content)
        assert line.startswith("explain: HREM has no word x region attention to show")


def test_a_failure_is_one_line_of_json_and_the_server_stays_up(sgr, monkeypatch):
    monkeypatch.setattr(sgr.service.gallery, "search_image",
                        lambda *a: 1 / 0)  # a bug in a request
    r = sgr.get("/api/image/0")
    assert r.status_code == 500 and r.json() == {
        "error": "image: the server failed (division by zero); see its log"}
    monkeypatch.undo()
    assert sgr.get("/api/image/0").status_code == 200


def test_health_and_metrics(sgr):
    before = sgr.get("/api/metrics").json()
    for q in ("a dog", "a cat", "two men"):
        assert sgr.get("/api/search", params={"q": q, "k": 3}).status_code == 200
    m = sgr.get("/api/metrics").json()
    assert m["served"]["search"] == before["served"].get("search", 0) + 3
    assert m["queries"] >= 3 and m["waiting"] == 0
    lat = m["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    h = sgr.get("/api/health").json()
    assert h["n_images"] == N_TEST and h["n_captions"] == 5 * N_TEST and h["images"]
    assert h["matchers"] == ["SGR"] and h["explain"] and h["workers"] == 2
    assert h["two_stage"] is None and h["recall"]["t2i"]["R@1"] >= 0


# ----------------------------------------------------------------------------- the process

def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def demo_gallery(tmp_path_factory):
    """A gallery of the demo's size and dimensions (its 200 synthetic test images, an SGR of
    its flags, untrained): what the load test queries."""
    import demo
    import synthetic
    root = tmp_path_factory.mktemp("serve_demo")
    data, vocab = tiny_dataset(str(root), n_train=5, n_dev=4,
                               n_test=synthetic.DEFAULTS["n_test"],
                               img_dim=synthetic.DEFAULTS["img_dim"])
    opt = opts.parse_opt(train_args(data, vocab, str(root / "run"), "--img_dim",
                                    str(synthetic.DEFAULTS["img_dim"]), *demo.DEMO_FLAGS,
                                    *matchers.matcher_class("SGR").demo_flags))
    opt.device, opt.workers = "cpu", 0
    opt.vocab_size = len(matchers.matcher_class("SGR").vocabulary(opt)[0])
    torch.manual_seed(0)
    path = str(root / "SGR.pth.tar")
    torch.save({"epoch": 1, "model": matchers.build_model(opt).state_dict(), "best_rsum": 0.0,
                "opt": opt, "Eiters": 1}, path)
    sims = str(root / "SGR.npy")  # the failures' matrix: the server starts in seconds
    with one_torch_thread():
        evaluation.main(["--model_path", path, "--data_path", data, "--vocab_path", vocab,
                         "--split", "test", "--device", "cpu", "--save_sims", sims])
    captions = open(os.path.join(data, "synth_precomp", "test_caps.txt"),
                    encoding="utf-8").read().splitlines()
    return argparse.Namespace(root=root, data=data, vocab=vocab, path=path, captions=captions,
                              sims=sims)


def test_process_under_load_then_sigterm(demo_gallery, tmp_path):
    """32 clients x 25 queries against `python serve.py` on the demo-sized gallery: every
    answer 200 and equal to the single-client answer, in bounded time, the server's memory
    flat; then SIGTERM: it exits within 5 s and its port is free again."""
    g = demo_gallery
    before = snapshot(g.root)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "serve.py"), "--model_path", g.path, "--data_path",
         g.data, "--vocab_path", g.vocab, "--split", "test", "--device", "cpu", "--port", "0",
         "--no_cache", "--sims", g.sims], cwd=str(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 300  # a loaded machine
        while not lines:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        base = lines[0].split()[1].rstrip("/")
        assert base.startswith("http://127.0.0.1:"), lines[0]
        port = int(base.rsplit(":", 1)[1])
        client = httpx.Client(base_url=base, timeout=TIMEOUT)
        while True:  # uvicorn starts after the line
            try:
                if client.get("/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        queries = [g.captions[j] for j in range(0, 25 * 7, 7)]  # 25 distinct queries
        single = {q: client.get("/api/search", params={"q": q, "k": 10}).json()
                  for q in queries}
        rss_start = rss_kib(proc.pid)
        answers, latencies, errors_ = [], [], []

        def one_client(c):
            with httpx.Client(base_url=base, timeout=TIMEOUT) as cl:
                for j in range(25):
                    q = queries[(c + j) % 25]
                    t0 = time.perf_counter()
                    r = cl.get("/api/search", params={"q": q, "k": 10})
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors_.append((r.status_code, r.text[:200]))
                    else:
                        answers.append((q, r.json()))
        t0 = time.perf_counter()
        clients = [threading.Thread(target=one_client, args=(c,)) for c in range(32)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=max(1.0, 240 - (time.perf_counter() - t0)))
        wall = time.perf_counter() - t0
        assert not any(t.is_alive() for t in clients), "the load test ran past 240 s"
        rss_end = rss_kib(proc.pid)
        assert not errors_, errors_[:3]
        assert len(answers) == 32 * 25
        for q, a in answers:
            assert a == single[q]
        lat = np.array(latencies) * 1000
        print("\nLOAD 32 clients x 25 queries: p50 %.1f ms, p95 %.1f ms, max %.1f ms, %.1f "
              "queries/s; server RSS %.1f MB -> %.1f MB" % (
                  np.percentile(lat, 50), np.percentile(lat, 95), lat.max(), len(lat) / wall,
                  rss_start / 1024, rss_end / 1024))
        assert rss_end - rss_start < max(64 * 1024, rss_start // 4), (rss_start, rss_end)
        metrics = client.get("/api/metrics").json()
        assert metrics["served"]["search"] == 25 + 32 * 25
        client.close()
        proc.send_signal(signal.SIGTERM)
        t_stop = time.time()
        proc.wait(timeout=5)
        assert time.time() - t_stop < 5
        err = proc.stderr.read()
        # uvicorn stops gracefully, then lets SIGTERM end the process as it would have
        assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
        assert "Traceback" not in err and "Finished server process" in err, err[-2000:]
        # nothing listens there any more (SO_REUSEADDR, as servers bind: the closed
        # connections' TIME_WAIT may stay)
        socket.create_server(("127.0.0.1", port)).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert_unchanged(before, g.root, new_allowed=False)
    assert os.listdir(tmp_path) == []
