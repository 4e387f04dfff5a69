"""The search page and HTTP API: a checkpoint's gallery behind a real server, with a failures
browser (FastAPI on uvicorn).

retrieve.py answers one query per command, and most of its seconds are Python's and torch's
start-up; this loads the gallery once (`retrieve.Gallery`, with its cache: the same encodings
and scores as `retrieve.py`, hence as `evaluation.py --save_sims`) and answers each query in
milliseconds, as clip-retrieval's clip-back does for CLIP indices, with a page to browse the
results and the model's worst mistakes.

    python serve.py --model_path runs/demo_SGR/checkpoint/model_best.pth.tar \\
        --data_path data --vocab_path vocab --split test
    # then open http://127.0.0.1:8000/ (the page) or /docs (the API, FastAPI's OpenAPI page)

The API (JSON; every error is a 4xx `{"error": "<parameter>: <problem>; <fix>"}` of one line):
  GET /api/search?q=TEXT&k=N     the object of `retrieve.py --query TEXT --topk N --json`
  GET /api/image/{index}?k=N     the object of `retrieve.py --image INDEX --topk N --json`
  GET /api/image/{index}/file    that image's file from --images (by index only)
  GET /api/explain?q=TEXT&index=I  the word x region attention of one pair, a PNG
  GET /api/failures?direction=t2i|i2t&n=N  the queries whose ground truth ranks worst
  GET /api/health, /api/metrics  what is served; queries served and latency percentiles

The failures come from a similarity matrix: `--sims FILE.npy` (evaluation.py's --save_sims of
the same checkpoints, data and split, checked through its record), or the split scored once at
start-up exactly as evaluation.py scores it (matrix.score_shards); the ranks are the
evaluation's (ranking.i2t, ranking.t2i). Scoring runs in a pool of `--workers` threads (default:
one per core, each with cores // workers torch threads: no oversubscription); requests queue
for it, up to MAX_WAITING (then 503). Safety: it binds 127.0.0.1 unless --host says otherwise
(with a warning); it serves image files by index only; every text the page shows is set as
text, never as HTML, and `<`, `>` and `&` are escaped in the JSON too; q is at most MAX_Q
characters, k at most the gallery and MAX_K; a request head above MAX_REQUEST_HEAD is refused
by uvicorn; requests never write a file.
"""
import asyncio
import collections
import contextlib
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import threadpoolctl
import torch
from tqdm import tqdm

import distributed
import errors
import evaluation
import index as shortlist_index
import matrix
import outputs
import ranking
import retrieve

log = logging.getLogger(__name__)

TOOL = "serve.py"
MAX_Q = 1000                 # characters of a query
MAX_K = 1000                 # results of one query, failures of one list
ABOVE = 5                    # of what ranked above a failure's ground truth, the first ABOVE
MAX_WAITING = 256            # requests waiting for a worker; more get a 503
MAX_REQUEST_HEAD = 16 << 20  # bytes of a request line and headers (uvicorn's h11 limit)
LATENCIES = 10000            # the latest latencies kept for the percentiles
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGES = {"": ("index.html", "text/html; charset=utf-8"),
         "app.js": ("app.js", "text/javascript; charset=utf-8"),
         "style.css": ("style.css", "text/css; charset=utf-8")}
# the page's own files only: no inline script, no other origin (it works offline)
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAVE_SIMS = "evaluation.py --save_sims"


class BadRequest(Exception):
    """A request the API refuses: its HTTP status and one line, `<parameter>: <problem>; <fix>`."""

    def __init__(self, status, where, problem, fix):
        super().__init__("%s: %s; %s" % (where, problem, fix))
        self.status = status


def _shown(value, most=40):
    """A value of a request, quoted in an error line (cut: it may be megabytes)."""
    text = json.dumps(str(value), ensure_ascii=False)
    return text if len(text) <= most else text[:most - 4] + '..."'


# ----------------------------------------------------------------------------- the matrix

def load_sims(path, gallery, overrides=None):
    """The (images, captions) matrix of `--sims FILE.npy`, refused (sims_foreign) unless it is
    a finished evaluation.py --save_sims matrix of this gallery: its record says so, with the
    shape, split, checkpoints (by sha256), precision (fp32, as the server scores) and matcher
    flags (`overrides`) of the gallery, and every pair is scored."""
    where = "--sims %s" % path

    def refuse(why):
        return errors.error("sims_foreign", where, why=why)
    if not os.path.isfile(path):
        raise refuse("no such file")
    record = outputs.made_record(path) or {}
    if record.get("made_by") != SAVE_SIMS:
        raise refuse("no record of evaluation.py --save_sims beside it")
    ident = record.get("identity") or {}
    shape = [gallery.n_images, len(gallery.members[0].enc.cap_lens)]
    if ident.get("fold5"):
        raise refuse("it holds the five folds of --fold5 only")
    if ident.get("split") != gallery.split or ident.get("shape") != shape:
        raise refuse("it is the %s matrix of %s, not the gallery's %s of %s" % (
            "x".join(map(str, ident.get("shape") or [])), ident.get("split"),
            "x".join(map(str, shape)), gallery.split))
    for k, m in enumerate(gallery.members + [None]):
        tag = "checkpoint" if k == 0 else "checkpoint%d" % (k + 1)
        theirs = ident.get(tag + " sha256")
        if (m is None) != (theirs is None) or (m and theirs != outputs.file_digest(m.path)):
            raise refuse("it was scored with other checkpoints than --model_path%s" % (
                " and --model_path2" if len(gallery.members) > 1 else ""))
        if m is not None and ident.get(tag + " precision", "fp32") != "fp32":
            raise refuse("it was scored in %s; the server scores in fp32"
                         % ident[tag + " precision"])
    ours = {"--" + k: v if isinstance(v, (bool, int, float, str)) else repr(v)
            for k, v in (overrides or {}).items()}
    theirs = {k: v for k, v in ident.items() if k.startswith("--")}
    if ours != theirs:
        raise refuse("its matcher flags are %s, the server's %s" % (
            " ".join("%s %s" % kv for kv in sorted(theirs.items())) or "none",
            " ".join("%s %s" % kv for kv in sorted(ours.items())) or "none"))
    try:
        sims = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise refuse("it cannot be read: %s" % errors.first_line(e)) from None
    if list(sims.shape) != shape:
        raise refuse("it holds a %s array" % "x".join(map(str, sims.shape)))
    sims = np.array(sims, dtype=np.float64)
    missing = int(np.sum(~np.isfinite(sims)))
    if missing:
        raise refuse("%d pairs are not scored yet: run its evaluation again to finish it"
                     % missing)
    return sims


def score_sims(gallery):
    """The split's (images, captions) matrix scored as evaluation.py scores it (the same grid
    of shards, matrix.score_shards, the members' encodings as encode_data made them), with a
    progress bar."""
    scorers = []
    for m in gallery.members:
        enc = gallery.encodings(m, captions=True)
        caps = enc.caption_block(np.arange(len(enc.cap_lens)))  # padded as encode_data pads
        scorers.append((m.model, evaluation.Encoded(enc.all_images(), caps,
                                                    enc.cap_lens.tolist(), enc.extra)))
    shape = (gallery.n_images, len(gallery.members[0].enc.cap_lens))
    shards = matrix.shard_grid(matrix.score_regions(*shape))
    sims = np.full(shape, np.nan)
    with tqdm(total=shape[0] * shape[1], unit="pair", unit_scale=True, leave=False,
              desc="failures: scoring the split") as bar:
        matrix.score_shards(scorers, shards, range(len(shards)), sims, bar=bar)
    return sims


class Failures:
    """The split's queries ranked by where their ground truth ranks (worst first), from the
    evaluation's ranks of the matrix (ranking.t2i: caption j's image j // 5; ranking.i2t: an
    image's best-ranked caption)."""

    def __init__(self, sims, source):
        self.sims, self.source = sims, source
        self.per = sims.shape[1] // sims.shape[0]  # captions per image
        self.ranks, self.order, self.recall = {}, {}, {}
        for way, fn in (("t2i", ranking.t2i), ("i2t", ranking.i2t)):
            r, (ranks, _) = fn(None, None, None, sims, return_ranks=True)
            self.ranks[way] = ranks.astype(np.int64)                  # 0-based
            self.order[way] = np.argsort(-self.ranks[way], kind="stable")
            self.recall[way] = {"R@1": r[0], "R@5": r[1], "R@10": r[2], "medr": r[3],
                                "meanr": r[4]}

    def worst(self, way, n, captions):
        """The n queries of direction `way` whose ground truth ranks worst."""
        out = []
        for q in self.order[way][:n]:
            q, rank = int(q), int(self.ranks[way][q])
            row = self.sims[:, q] if way == "t2i" else self.sims[q]
            pos = ranking.descending_positions(row[None])[0]          # the evaluation's order
            top = np.argsort(pos)[:min(rank, ABOVE)]
            if way == "t2i":
                truth = q // self.per
                item = {"query": q, "text": captions[q], "image": truth}
                above = [{"index": int(i), "score": float(row[i]),
                          "captions": captions[i * self.per:(i + 1) * self.per]} for i in top]
            else:
                own = np.arange(q * self.per, (q + 1) * self.per)
                truth = int(own[np.argmin(pos[own])])
                item = {"query": q, "captions": captions[q * self.per:(q + 1) * self.per],
                        "caption": truth, "text": captions[truth]}
                above = [{"index": int(j), "score": float(row[j]), "text": captions[j],
                          "image": int(j) // self.per} for j in top]
            for r, a in enumerate(above):
                a["rank"] = r + 1
            item.update(rank=rank + 1, score=float(row[truth]), above=above)
            out.append(item)
        return out


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Queries served per endpoint, refusals, and the percentiles of the latest LATENCIES
    latencies (queued time included)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.served = collections.Counter()
        self.refused = collections.Counter()
        self.latencies = collections.deque(maxlen=LATENCIES)
        self.waiting = 0

    def add(self, endpoint, seconds):
        with self.lock:
            self.served[endpoint] += 1
            self.latencies.append(seconds)

    def snapshot(self):
        with self.lock:
            lat = np.array(self.latencies) * 1000.0
            served, refused, waiting = dict(self.served), dict(self.refused), self.waiting
        pct = ({"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "p99": float(np.percentile(lat, 99)), "max": float(lat.max())}
               if len(lat) else {"p50": None, "p95": None, "p99": None, "max": None})
        return {"queries": sum(served.values()), "served": served, "refused": refused,
                "waiting": waiting, "latency_ms": dict(pct, over=len(lat)),
                "uptime_s": round(time.time() - self.started, 3)}


# ----------------------------------------------------------------------------- the app

class Service:
    """The loaded gallery, its failures and image files, and the worker pool that scores."""

    def __init__(self, gallery, failures, files=None, workers=1, two_stage=None):
        self.gallery, self.failures, self.files = gallery, failures, files
        self.workers, self.two_stage = workers, two_stage
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score")
        self.metrics = Metrics()
        enc = gallery.members[0].enc
        self.captions, self.n_captions = enc.captions, len(enc.cap_lens)
        self.explains = [type(m.model).attention_info is not None for m in gallery.members]

    async def run(self, endpoint, fn, *args):
        """fn(*args) in the pool, after the requests before it; its latency recorded."""
        m = self.metrics
        with m.lock:
            if m.waiting >= MAX_WAITING:
                m.refused["busy"] += 1
                raise BadRequest(503, endpoint, "%d requests are waiting" % m.waiting,
                                 "retry in a moment")
            m.waiting += 1
        start = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except errors.SGRAFError:
            raise
        except Exception as e:  # a bug: one line in the answer, the traceback in the log
            log.error("serve: %s failed", endpoint, exc_info=e)
            raise BadRequest(500, endpoint, "the server failed (%s)" % errors.first_line(e),
                             "see its log") from None
        finally:
            with m.lock:
                m.waiting -= 1
        m.add(endpoint, time.perf_counter() - start)
        return out

    def k(self, k, n, what):
        most = min(n, MAX_K)
        if not 1 <= k <= most:
            raise BadRequest(422, "k", "%d is out of range (the gallery has %d %s)" % (k, n, what),
                             "pass k from 1 to %d" % most)
        return k

    def query(self, q):
        if q is None or not q.strip():
            raise BadRequest(422, "q", "the query is empty", "pass ?q=TEXT, e.g. ?q=a+dog+runs")
        if len(q) > MAX_Q:
            raise BadRequest(422, "q", "%d characters, more than %d" % (len(q), MAX_Q),
                             "pass a shorter query")
        return q

    def index(self, index, n, what="image"):
        if not 0 <= index < n:
            raise BadRequest(404, "index", "no %s %d: the %s split has %d (0 to %d)" % (
                what, index, self.gallery.split, n, n - 1), "pass an index in that range")
        return index

    def explain(self, q, index):
        """The PNG of the word x region attention of (image `index`, query q), in memory."""
        g = self.gallery
        hits = g.search_text(q, g.n_images)
        hits["results"] = [r for r in hits["results"] if r["index"] == index]
        files = self.files if self.files is not None and self.files.boxes is not None else None
        buf = io.BytesIO()
        g.explain(hits, buf, files=files)
        return buf.getvalue()

    def health(self):
        g = self.gallery
        return {"status": "ok", "models": [m.path for m in g.members],
                "matchers": [m.opt.module_name for m in g.members], "data": g.split_dir,
                "split": g.split, "n_images": g.n_images, "n_captions": self.n_captions,
                "images": self.files is not None, "explain": any(self.explains),
                "failures": self.failures.source, "recall": self.failures.recall,
                "workers": self.workers, "torch_threads": torch.get_num_threads(),
                "two_stage": self.two_stage}


def make_app(service, allowed_hosts=None):
    """The FastAPI app of a Service. `allowed_hosts`: the Host headers answered (the loopback
    names by default: a page of another site cannot reach the server by DNS rebinding)."""
    from fastapi import FastAPI, Path, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    class SafeJSON(JSONResponse):
        """JSON with <, > and & escaped (\\u003c...): inert wherever it is pasted."""
        def __init__(self, content, status_code=200, headers=None, **kw):
            super().__init__(content, status_code, dict(HEADERS, **(headers or {})), **kw)

        def render(self, content):
            text = json.dumps(content, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"))
            return (text.replace("<", "\\u003c").replace(">", "\\u003e")
                    .replace("&", "\\u0026").encode("utf-8"))

    pages = {}
    for route, (name, media) in PAGES.items():
        with open(os.path.join(STATIC, name), "rb") as f:
            pages[route] = (f.read(), media)

    def error(status, line):
        if status < 500:
            with service.metrics.lock:
                service.metrics.refused[str(status)] += 1
        return SafeJSON({"error": line}, status_code=status, headers=HEADERS)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.pool.shutdown(wait=True, cancel_futures=True)
        log.info("serve: stopped after %d queries", service.metrics.snapshot()["queries"])

    app = FastAPI(title="SGRAF search", default_response_class=SafeJSON, lifespan=lifespan,
                  redirect_slashes=False,
                  description="A split of the dataset searched with a checkpoint's matcher "
                              "(retrieve.Gallery): the same objects as retrieve.py --json.")
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=list(allowed_hosts or ["127.0.0.1", "localhost", "[::1]"]))

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return error(exc.status, str(exc))

    @app.exception_handler(errors.SGRAFError)
    async def refused(request, exc):  # a check of the gallery's (the API checks first)
        return error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        e = exc.errors()[0]
        name = str(e["loc"][-1]) if e.get("loc") else "request"
        if e.get("type") == "missing":
            return error(422, "%s: missing; pass ?%s=..." % (name, name))
        return error(422, "%s: %s is not a valid %s; see /docs" % (
            name, _shown(e.get("input")), "whole number" if "int" in e.get("type", "") else
            "value"))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        what = {404: "no such page or endpoint; see /docs for the API",
                405: "method not allowed; use GET"}.get(exc.status_code, "%s; see /docs" %
                                                        (exc.detail or "refused"))
        return error(exc.status_code, "%s: %s" % (_shown(request.url.path), what))

    def page(route):
        body, media = pages[route]
        return Response(body, media_type=media,
                        headers=dict(HEADERS, **{"Content-Security-Policy": PAGE_POLICY}))

    @app.get("/", include_in_schema=False)
    async def index():
        return page("")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in pages or not name:
            raise BadRequest(404, "static", "no such file", "the page's files are app.js "
                             "and style.css")
        return page(name)

    g = service.gallery

    @app.get("/api/search", summary="the top k images for a text (retrieve.py --query --json)")
    async def search(q: str = Query(None, description="free text, at most %d characters"
                                    % MAX_Q),
                     k: int = Query(10, description="results, 1 to min(images, %d)" % MAX_K)):
        q = service.query(q)
        k = service.k(k, g.n_images, "images")
        return dict(await service.run("search", g.search_text, q, k))

    @app.get("/api/image/{index}", summary="the top k captions for an image of the split "
                                           "(retrieve.py --image --json)")
    async def image(index: int = Path(description="the image's index in the split"),
                    k: int = Query(10, description="results, 1 to min(captions, %d)" % MAX_K)):
        service.index(index, g.n_images)
        k = service.k(k, service.n_captions, "captions")
        return dict(await service.run("image", g.search_image, index, k))

    @app.get("/api/image/{index}/file", summary="the image's file (--images), by index only",
             response_class=FileResponse)
    async def image_file(index: int = Path(description="the image's index in the split")):
        if service.files is None:
            raise BadRequest(404, "index", "the server has no image files",
                             "start serve.py with --images DIR")
        service.index(index, g.n_images)
        return FileResponse(service.files.paths[index], headers=HEADERS)

    @app.get("/api/explain", summary="the word x region attention of one pair, a PNG",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(q: str = Query(None, description="free text, at most %d characters"
                                     % MAX_Q),
                      index: int = Query(None, description="the image's index in the split")):
        q = service.query(q)
        if index is None:
            raise BadRequest(422, "index", "missing", "pass ?index=I, an image of the split")
        service.index(index, g.n_images)
        if not any(service.explains):
            m = g.members[0]
            raise BadRequest(422, "explain", "%s has no word x region attention to show: %s"
                             % (m.opt.module_name, m.model.no_attention_why),
                             "the search works without it")
        png = await service.run("explain", service.explain, q, index)
        return Response(png, media_type="image/png", headers=HEADERS)

    @app.get("/api/failures", summary="the queries whose ground truth ranks worst")
    async def failures(direction: str = Query("t2i", description="t2i (a caption's image) "
                                              "or i2t (an image's captions)"),
                       n: int = Query(20, description="queries, 1 to %d" % MAX_K)):
        if direction not in ("t2i", "i2t"):
            raise BadRequest(422, "direction", "%s is neither t2i nor i2t" % _shown(direction),
                             "pass direction=t2i or direction=i2t")
        f = service.failures
        total = len(f.ranks[direction])
        if not 1 <= n <= min(total, MAX_K):
            raise BadRequest(422, "n", "%d is out of range (%d queries)" % (n, total),
                             "pass n from 1 to %d" % min(total, MAX_K))
        worst = await service.run("failures", f.worst, direction, n, service.captions)
        return {"direction": direction, "source": f.source, "n_queries": total,
                "recall": f.recall[direction], "failures": worst}

    @app.get("/api/health", summary="what is served")
    async def health():
        return service.health()

    @app.get("/api/metrics", summary="queries served, latency percentiles (ms)")
    async def metrics():
        return service.metrics.snapshot()

    return app


# ----------------------------------------------------------------------------- the command

def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def listen(host, port):
    """The server's socket, bound before any compute (a port in use is one line)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise errors.error("port_unavailable", "--port %d" % port, host=host,
                           reason=errors.first_line(e)) from None


def build_service(p, args):
    """The gallery (loaded, encoded, warm), its failures and its files: a Service."""
    options = retrieve.gallery_options(p, args)
    gallery = retrieve.Gallery(args.model_path, **options)
    for m in gallery.members:  # every encoding in memory now: a request reads, never writes
        gallery.encodings(m, captions=True).all_images()
    if gallery.digests:
        gallery.digests.save()
    enc = gallery.members[0].enc
    files = (retrieve.ImageFiles(args.images, args.image_ids, gallery.split_dir, args.split,
                                 gallery.n_images, enc.im_div, boxes=False)
             if args.images else None)
    if args.sims:
        failures = Failures(load_sims(args.sims, gallery, options["overrides"]),
                            "--sims %s" % args.sims)
    else:
        failures = Failures(score_sims(gallery), "scored at start-up")
    if any(type(m.model).attention_info is not None for m in gallery.members):
        import plots  # noqa: F401  (matplotlib and its font cache, before any request)
        from matplotlib import font_manager  # noqa: F401
    two_stage = ({"shortlist": args.shortlist, "rerank_k": args.rerank_k, "index": args.index}
                 if args.shortlist else None)
    return Service(gallery, failures, files, args.workers, two_stage)


def build_parser():
    """serve.py's flags; `.matcher_dests`: the matchers' evaluation flags among them."""
    p = errors.ArgumentParser(
        prog="serve.py", description="Serve a split's search page and HTTP API: any checkpoint "
                                     "(or two), its failures, the attention of each result")
    p.add_argument("--sims", metavar="FILE.npy", default=None,
                   help="the failures from this evaluation.py --save_sims matrix (default: "
                        "the split is scored at start-up)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: a free port")
    p.add_argument("--workers", type=int, default=None,
                   help="scoring threads (default: one per core)")
    return retrieve.add_gallery_flags(
        p, "the gallery's split",
        "the split's image files, shown in the grid (and, with the split's "
        "{split}_ims_bbx.npy, each word's most attended region)")


@errors.exit_on_error
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if not 0 <= args.port <= 65535:
        raise errors.error("flag_range", "--port %d" % args.port, range="0 to 65535")
    errors.check_positive(args, ["workers", "rerank_k"])
    distributed.check_device(args.device)
    shortlist_index.check_flags(args.shortlist, args.rerank_k, args.index)
    if args.image_ids and not args.images:
        raise errors.error("images_dir", "--images (needed by --image_ids)")
    if args.host not in LOOPBACK:
        log.warning(errors.message("serve_host", "--host %s" % args.host))
    args.workers = args.workers or cores()
    sock = listen(args.host, args.port)
    import uvicorn
    try:
        service = build_service(p, args)
        # the start-up used every core; each worker now gets its share of torch's and the
        # BLAS's threads (no oversubscription)
        threads = max(1, cores() // args.workers)
        torch.set_num_threads(threads)
        threadpoolctl.threadpool_limits(threads)
        app = make_app(service, None if args.host in LOOPBACK else ["*"])
        host, port = sock.getsockname()[:2]
        url = "http://%s:%d/" % ("[%s]" % host if ":" in host else host, port)
        print("serve: %s (the page), %sdocs (the API); %s on %s %s: %d images, %d captions; "
              "failures %s; %d workers" % (url, url, " + ".join(
                  m.opt.module_name for m in service.gallery.members), service.gallery.data_name,
                  args.split, service.gallery.n_images, service.n_captions,
                  service.failures.source, args.workers), flush=True)
        errors.on_interrupt("the server stopped; nothing was written",
                            "run the same command to serve again")
        config = uvicorn.Config(app, http="h11", h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
                                limit_concurrency=4 * MAX_WAITING, timeout_graceful_shutdown=3,
                                access_log=False, log_level="info", lifespan="on")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
