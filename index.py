"""Two-stage retrieval at scale: the shortlist's index, and a gallery stored on disk (issue 23).

A dual encoder (a matcher that `embeds_alone`, HREM) gives one vector per image and per caption
(`Matcher.shortlist_embeddings`); a query's shortlist is its K best gallery items by their dot
product, which a cross-attention matcher then re-ranks (retrieve.py --shortlist, bench.py --what
two_stage). LightningDOT shortlists with FAISS in the same way; ALBEF, BLIP and X-VLM re-rank
their fast score's k_test best.

`ShortlistIndex` holds the gallery's vectors:
  flat   exact (the default): the float64 dot products of the K best, found by a float32 pass
         over the gallery and a float64 re-scoring of every item that float32 rounding could
         place among them; ordered as `np.argsort(scores)[::-1]` orders them (ties: the higher
         index first)
  hnsw   faiss.IndexHNSWFlat (inner product): approximate, its candidates re-scored in float64
  ivf    faiss.IndexIVFFlat (inner product): approximate, likewise
An approximate index reports its recall@K against flat (`recall`).

`GalleryStore` is a gallery's per-image arrays on disk, one `.npy` each, memory-mapped: a query
reads the rows of its shortlist only, so that a 100K-image gallery's regions (7.4 GB in float16
at 36 x 1024) need not be in RAM. It is written chunk by chunk with a progress bar, and a killed
build continues where it stopped.

`check_flags` and `TwoStage` are retrieve.py's two-stage search (retrieve.Gallery's mixin).

Letters: N gallery items, d the shortlist's dimension, K the re-ranked candidates.
"""
import json
import logging
import os

import numpy as np
from tqdm import tqdm

import errors
import outputs

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf")
BLOCK = 65536          # gallery rows per float32 pass (flat), per faiss add
U32 = 2.0 ** -24       # float32's unit roundoff


def descending(ids, scores):
    """ids and scores ordered as `np.argsort(scores)[::-1]` orders a gallery: by score,
    descending, equal scores the higher index first."""
    ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    order = np.lexsort((-ids, -scores))
    return ids[order], scores[order]


def exact_scores(vecs, ids, q):
    """The float64 dot products of the gallery rows `ids` with q (d,), float32 as they are."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.argsort(ids, kind="stable")  # a memory map is read in its order
    out = np.empty(len(ids))
    out[rows] = np.asarray(vecs[ids[rows]], dtype=np.float64) @ np.asarray(q, np.float64)
    return out


def top_k_exact(vecs, q, k, progress=False):
    """(ids, float64 scores) of the k best rows of vecs (N, d) for q (d,), in the order
    `np.argsort(vecs @ q)[::-1]` gives in float64. A float32 pass scores every row (in blocks:
    vecs may be a memory map); every row within twice float32's error bound of the k-th best is
    then scored in float64, so that none of the float64 top k is missed."""
    n, d = vecs.shape
    k = min(int(k), n)
    q32 = np.asarray(q, dtype=np.float32)
    s32 = np.empty(n, dtype=np.float32)
    norms = np.empty(n, dtype=np.float32)
    for a in tqdm(range(0, n, BLOCK), leave=False, disable=not progress or None,
                  desc="flat scores"):
        block = np.asarray(vecs[a:a + BLOCK], dtype=np.float32)     # (b, d)
        s32[a:a + len(block)] = block @ q32
        norms[a:a + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block))
    if k < n:
        kth = np.partition(s32, n - k)[n - k]
        # |float32 dot - exact| <= d u ||v|| ||q|| (1 + O(du)); 4x for BLAS's blocked sums
        tol = 4.0 * d * U32 * float(norms.max()) * float(np.linalg.norm(q32))
        cand = np.flatnonzero(s32 >= kth - 2 * tol)
    else:
        cand = np.arange(n)
    ids, scores = descending(cand, exact_scores(vecs, cand, q32))
    return ids[:k], scores[:k]


class ShortlistIndex:
    """The shortlist's gallery vectors (N, d) float32 (`vecs`: an array or a memory map) under
    one of KINDS. `search(q, k)`: (ids, float64 dot products), best first. Approximate kinds
    are built at once (faiss, inner product) with a progress bar; their parameters: hnsw_m,
    ef_construction, ef_search (hnsw), nlist, nprobe (ivf; defaults from N)."""

    def __init__(self, vecs, kind="flat", hnsw_m=32, ef_construction=80, ef_search=256,
                 nlist=None, nprobe=None, progress=True):
        if kind not in KINDS:
            raise errors.error("flag_choice", "--index %s" % kind, unknown=kind,
                               choices=", ".join(KINDS))
        self.vecs, self.kind, self.progress = vecs, kind, progress
        self.n, self.d = vecs.shape
        self.faiss = None
        self.params = {}
        if kind != "flat":
            self._build(hnsw_m, ef_construction, ef_search, nlist, nprobe)

    def save(self, path):
        """An approximate index's FAISS index to `path` (written beside it, then renamed)."""
        import faiss
        faiss.write_index(self.faiss, path + ".partial")
        os.replace(path + ".partial", path)

    @classmethod
    def load(cls, vecs, path, ef_search=256):
        """The index `save` wrote, over the same vectors."""
        import faiss
        self = cls(vecs, "flat", progress=False)
        self.faiss = faiss.read_index(path)
        hnsw = getattr(self.faiss, "hnsw", None)
        if hnsw is not None:
            self.kind, hnsw.efSearch = "hnsw", ef_search
            self.params = {"M": hnsw.nb_neighbors(1), "efConstruction": hnsw.efConstruction,
                           "efSearch": ef_search}
        else:
            self.kind = "ivf"
            self.params = {"nlist": self.faiss.nlist, "nprobe": self.faiss.nprobe}
        return self

    @property
    def approximate(self):
        return self.kind != "flat"

    def _build(self, hnsw_m, ef_construction, ef_search, nlist, nprobe):
        import faiss
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            self.params = {"M": hnsw_m, "efConstruction": ef_construction,
                           "efSearch": ef_search}
        else:
            # about 4 sqrt(N) lists (FAISS's guideline), each trained on >= 39 points
            nlist = nlist or max(1, min(int(4 * np.sqrt(self.n)), self.n // 39))
            nprobe = nprobe or max(1, nlist // 8)
            quantizer = faiss.IndexFlatIP(self.d)
            index = faiss.IndexIVFFlat(quantizer, self.d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(self.n, size=min(self.n, 64 * nlist), replace=False))
            index.cp.min_points_per_centroid = 1  # a small gallery: fewer than 39 per list
            index.train(np.ascontiguousarray(self.vecs[sample], dtype=np.float32))
            index.nprobe = nprobe
            self._quantizer = quantizer  # kept alive with the index
            self.params = {"nlist": nlist, "nprobe": nprobe}
        for a in tqdm(range(0, self.n, BLOCK), leave=False, desc="%s index" % self.kind,
                      disable=not self.progress or None):
            index.add(np.ascontiguousarray(self.vecs[a:a + BLOCK], dtype=np.float32))
        self.faiss = index

    def search(self, q, k):
        """(ids, float64 scores) of the k best gallery items for q (d,), best first (an
        approximate index: its candidates, re-scored exactly and ordered alike)."""
        k, q = min(int(k), self.n), np.asarray(q, dtype=np.float32)  # (d,), as the vectors
        if not self.approximate:
            return top_k_exact(self.vecs, q, k)
        _, ids = self.faiss.search(q[None], k)
        ids = ids[0][ids[0] >= 0]
        return descending(ids, exact_scores(self.vecs, ids, q))

    def recall(self, q, k, ids=None):
        """recall@k of this index against flat for q: the share of the exact top k that the
        index's top k (`ids`, else searched) holds. 1.0 for flat."""
        k = min(int(k), self.n)
        if not self.approximate:
            return 1.0
        ids = self.search(q, k)[0] if ids is None else ids[:k]
        exact = top_k_exact(self.vecs, q, k)[0]
        return len(np.intersect1d(ids, exact)) / float(k)


# ----------------------------------------------------------------------------- retrieve.py

def check_flags(shortlist, rerank_k, index):
    """The two-stage flags, before any model is loaded: --shortlist and --rerank_k go
    together, K >= 1, --index is one of index.KINDS and needs a shortlist."""
    if index not in KINDS:
        raise errors.error("flag_choice", "--index %s" % index, unknown=index,
                           choices=", ".join(KINDS))
    if rerank_k is not None and not shortlist:
        raise errors.error("rerank_needs_shortlist", "--rerank_k %d" % rerank_k)
    if shortlist and rerank_k is None:
        raise errors.error("shortlist_needs_k", "--shortlist %s" % shortlist)
    if rerank_k is not None and rerank_k <= 0:
        raise errors.error("flag_positive", "--rerank_k %d" % rerank_k)
    if index != "flat" and not shortlist:
        raise errors.error("flag_unsupported", "--index %s" % index, model="the exhaustive "
                           "search", why="it holds the --shortlist model's vectors")


class TwoStage:
    """retrieve.Gallery's two-stage search (a mixin): the shortlist's vectors of the split
    (`_vectors`), their index (`index`), and a query's shortlist re-ranked (`_two_stage`). The
    gallery provides `shortlist` (its Member), `members`, `encodings(m, captions)`,
    `rerank_k`, `index_kind`, `index_recall`, `_indexes` and `_warned`."""

    def _vectors(self, m, what):
        """The shortlist's vectors of the split's images or captions (float32)."""
        enc = self.encodings(m, captions=what == "captions")
        if what == "images":
            img = enc.img_embs
            return m.model.shortlist_embeddings(img, np.zeros((0, img.shape[1]), np.float32),
                                                [])[0]
        cap = enc.cap_embs
        return m.model.shortlist_embeddings(np.zeros((0, cap.shape[1]), np.float32), cap,
                                            enc.cap_lens)[1]

    def index(self, what):
        """The shortlist's ShortlistIndex of the split's images or captions, built once."""
        if what not in self._indexes:
            self._indexes[what] = ShortlistIndex(
                self._vectors(self.shortlist, what), self.index_kind)
        return self._indexes[what]

    def _two_stage(self, what, query, topk, rerank):
        """(order, results, the two_stage record, gallery size) of a query against `what`
        (images or captions): the shortlist's top K (query: its encoding context, or a
        vector) scored by `rerank(ids)` and ordered by it, then its next items in its own
        order, up to topk."""
        sl = self.shortlist
        if isinstance(query, dict):
            qvec = sl.model.shortlist_embeddings(
                np.zeros((0, query["cap"].shape[-1]), np.float32), query["cap"],
                query["lens"])[1][0]
        else:
            qvec = query
        idx = self.index(what)
        n, k = idx.n, min(self.rerank_k, idx.n)
        if self.rerank_k >= n and what not in self._warned:
            self._warned.add(what)
            log.warning(errors.message(
                "rerank_k_gallery", "--rerank_k %d" % self.rerank_k, k=self.rerank_k,
                direction="text to image" if what == "images" else "image to text", n=n,
                items=what))
        ids, sl_scores = idx.search(qvec, max(k, topk))
        # the candidates in gallery order, ordered by the re-ranker as the exhaustive search
        # orders the gallery (equal scores: the lower index first), so that K >= the gallery
        # gives the exhaustive search's results
        by_index = np.argsort(ids[:k], kind="stable")
        shortlisted, sl_k = ids[:k][by_index], sl_scores[:k][by_index]
        k = len(shortlisted)  # an approximate index may find fewer
        scores = np.asarray(rerank(shortlisted), dtype=np.float64)
        by_rerank = np.argsort(-scores, kind="stable")
        order = np.concatenate([shortlisted[by_rerank], ids[k:]])[:topk]
        results = []
        for r, i in enumerate(order):
            if r < k:
                p = by_rerank[r]
                results.append({"rank": r + 1, "index": int(i), "score": float(scores[p]),
                                "stage": "rerank", "shortlist_score": float(sl_k[p])})
            else:
                results.append({"rank": r + 1, "index": int(i), "score": float(sl_scores[r]),
                                "stage": "shortlist"})
        recall = None
        if idx.approximate and self.index_recall:
            recall = idx.recall(qvec, k, shortlisted)
        record = {"shortlist": sl.path, "shortlist_matcher": sl.opt.module_name,
                  "rerank_k": self.rerank_k, "reranked": k, "index": self.index_kind,
                  "index_params": idx.params, "index_recall": recall}
        return order, results, record, n


# ----------------------------------------------------------------------------- the store

class GalleryStore:
    """A gallery's per-item arrays in a directory, one `<name>.npy` each (N, ...), memory-mapped
    (`array(name)`), written by `build` chunk by chunk. `store.json` records the identity of
    what is stored (the caller's: the models, the data, the dtypes), the arrays' shapes and
    dtypes and how many rows are done: a build with the same identity continues there, one with
    another identity is refused (nothing is written over another gallery)."""

    META = "store.json"

    def __init__(self, root):
        self.root = root
        with open(os.path.join(root, self.META), encoding="utf-8") as f:
            self.meta = json.load(f)

    @property
    def complete(self):
        return self.meta["done"] == self.meta["n"]

    def array(self, name):
        """The array `name`, memory-mapped read-only (its rows 0..done-1 are written)."""
        return np.load(os.path.join(self.root, name + ".npy"), mmap_mode="r")

    def nbytes(self):
        return sum(os.path.getsize(os.path.join(self.root, n + ".npy"))
                   for n in self.meta["arrays"])

    @classmethod
    def build(cls, root, n, encode, identity, chunk=1024, dtypes=None, tool="index.py",
              flag="--store", progress=True):
        """Encode n items into `root`: encode(start, stop) -> {name: array (stop - start,
        ...)}, written into `<name>.npy` (float16 for the names `dtypes` maps to it), flushed,
        then `done` advanced in store.json (replaced atomically), chunk after chunk; a build
        of the same identity that was killed continues at its `done`. Returns the store."""
        dtypes = dtypes or {}
        meta_path = os.path.join(root, cls.META)
        store = None
        if os.path.lexists(root):
            if outputs.made_by(root) != tool:
                raise errors.error("file_not_made", root, tool=tool, flag=flag)
            if os.path.isfile(meta_path):  # else killed before its first chunk: start again
                store = cls(root)
                if store.meta["identity"] != identity or store.meta["n"] != n or \
                        store.meta["chunk"] != chunk:
                    raise errors.error("output_other_run", root, flag=flag,
                                       change="another gallery: %s" % outputs.identity_change(
                                           identity, store.meta["identity"]))
        else:
            outputs.check_writable(root)
            os.makedirs(root)
            outputs.mark_made(root, tool)
        start = store.meta["done"] if store else 0
        arrays = {}
        if store:
            arrays = {name: np.load(os.path.join(root, name + ".npy"), mmap_mode="r+")
                      for name in store.meta["arrays"]}
        bar = tqdm(total=n, initial=start, desc="gallery store", unit="item",
                   disable=not progress or None)
        meta = store.meta if store else None
        for a in range(start, n, chunk):
            b = min(a + chunk, n)
            out = encode(a, b)
            if not arrays:
                for name, x in out.items():
                    dt = np.dtype(dtypes.get(name, x.dtype))
                    arrays[name] = np.lib.format.open_memmap(
                        os.path.join(root, name + ".npy"), mode="w+", dtype=dt,
                        shape=(n,) + tuple(x.shape[1:]))
                meta = {"identity": identity, "n": n, "chunk": chunk, "done": 0,
                        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                   for k, v in arrays.items()}}
            for name, x in out.items():
                arrays[name][a:b] = x
                arrays[name].flush()
            meta["done"] = b
            _write_json(meta_path, meta)
            bar.update(b - a)
        bar.close()
        for x in arrays.values():
            del x
        return cls(root)


def _write_json(path, obj):
    """obj to path, fsynced, renamed over the old one (a killed build leaves the last one)."""
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
