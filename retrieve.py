"""Search a split with a sentence or an image, and show the attention behind each result.

What none of the originals answers: "what does this checkpoint return for my sentence?". The
gallery is a split of the dataset: its images for a text query (`--query`), its captions for an
image of the split (`--image N`). The split is encoded once, by `evaluation.encode_data` exactly
as `evaluation.py` encodes it, and cached; the query is scored against every gallery item by the
matcher's own `score` (for the cross-attention matchers, the batched fast path), so the scores
are those of `evaluation.py --save_sims`: a query equal to caption j of the split gets column j
of that matrix, `--image N` gets row N. Two checkpoints (`--model_path2`) score as evaluation.py's
ensemble does, by the mean of the two.

    python retrieve.py --model_path runs/f30k_precomp_SGR/checkpoint/model_best.pth.tar \
        --data_path data --split test --query "a man rides a bike down a hill"
    python retrieve.py --model_path SGR.pth.tar --model_path2 SAF.pth.tar --image 12 --json
    python retrieve.py ... --query "two dogs in the snow" --explain dogs.png \
        [--images flickr30k-images --image_ids data/f30k_precomp/test_ids.txt]

The cache (`--cache_dir`, default ~/.cache/sgraf/retrieve, or $XDG_CACHE_HOME/sgraf/retrieve;
never inside the data or checkpoint folders) holds each model's encodings of a split, keyed by
the sha256 of the checkpoint, of the split's files (every `{split}_*` and `{split}.*` file of the
split's directory), of the vocabulary and of the code that encodes, so that a changed file is
never served stale. Digests are remembered by each file's inode, size, mtime and ctime, so an
unchanged file is not read again; a file changed within 2 s of its hashing is hashed again.
Each file of an entry is recorded with its size and crc32 (computed as it is written) and
checked when read: a damaged entry is encoded again and replaced, with one warning line.

Two-stage (`--shortlist CKPT --rerank_k K [--index flat|hnsw|ivf]`): a dual encoder's vectors
shortlist the query's K best gallery items, which the model(s) re-rank; the rest follow in the
shortlist's order (index.TwoStage, docs/search.md#two-stage).

Everything a matcher does differently goes through the contract (contract.Matcher):
`query_batch` (free text -> the batch its text encoder takes, the tokens, the unknown words),
`forward_text`, `gallery_inputs` (what its `score` computes from the images alone, computed once
and cached: SGR/SAF's image global vectors), `score` and, for `--explain`,
`word_region_attention` and `attention_info`.
"""
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import torch

import data
import errors
import evaluation
import index as shortlist_index
import matchers
import matrix
import outputs
from cache import (CACHE_FORMAT, ENCODING_CODE, TOOL, CacheDamaged, Digests, Encodings,
                   default_cache_dir, split_files)

log = logging.getLogger(__name__)

CAPTION_CHUNK = 1024  # captions scored at once for an image query (padded to their longest)

def _special(token):
    """An encoder's special token (SCAN's <start>, BERT's [CLS], ...), not a word."""
    return (token.startswith("<") and token.endswith(">")) or \
        (token.startswith("[") and token.endswith("]"))


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ----------------------------------------------------------------------------- encodings

class Member:
    """One checkpoint of the gallery: its model, options, vocabulary, and its encodings of the
    split (from the cache, or encoded on first use)."""

    def __init__(self, path, model, opt, vocab, vocab_file, label):
        self.path, self.model, self.opt, self.vocab = path, model, opt, vocab
        self.vocab_file, self.label = vocab_file, label
        self.enc, self.loader, self.entry, self.key_inputs = None, None, None, None
        self.cached = False

    @property
    def n_images(self):
        if self.enc is not None:
            return self.enc.n_images
        dset = self.loader.dataset
        return (len(dset) + dset.im_div - 1) // dset.im_div


# ----------------------------------------------------------------------------- the gallery

class Hits(dict):
    """The answer to a query, as `--json` prints it: {"query": ..., "results": [{"rank",
    "index", "score", ...}], ...}. `context` (not printed) keeps what --explain needs."""
    context = None


class Gallery(shortlist_index.TwoStage):
    """A split, searched with one checkpoint or the ensemble of two (the mean of their scores,
    as evaluation.py's ensemble). The split's encodings come from the cache in `cache_dir`
    (None: no cache) or are made on first use and cached.

        g = Gallery("model_best.pth.tar", data_path="data", split="test")
        hits = g.search_text("a man rides a bike", topk=5)
        hits = g.search_image(12)
        g.explain(hits, "attention.png")
    """

    def __init__(self, model_path, data_path=None, split="test", model_path2=None,
                 vocab_path=None, data_name=None, device=None, feat_format=None,
                 cache_dir="default", overrides=None, check_flags=False, shortlist=None,
                 rerank_k=None, index="flat", index_recall=True):
        self.split = split
        shortlist_index.check_flags(shortlist, rerank_k, index)
        self.rerank_k, self.index_kind, self.index_recall = rerank_k, index, index_recall
        self._indexes, self._warned = {}, set()
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
        paths = [p for p in (model_path, model_path2) if p]
        loaded = [evaluation.load_model(p, data_path, vocab_path, device, feat_format,
                                        data_name=data_name, overrides=overrides)
                  for p in paths]
        unused = [type(m).vocab_path_unused for m, _, _, _ in loaded]
        if check_flags and vocab_path is not None and all(unused):
            raise errors.error("flag_unsupported", "--vocab_path %s" % vocab_path,
                               model=loaded[0][1].module_name, why=unused[0])
        labels = evaluation.model_labels(paths, [o for _, o, _, _ in loaded])
        self.members = []
        for path, (model, opt, vocab, _), label in zip(paths, loaded, labels):
            vocab_file = type(model).vocabulary(opt)[1]
            self.members.append(Member(path, model, opt, vocab, vocab_file, label))
        opt = self.members[0].opt
        self.shortlist = None  # the dual encoder whose top rerank_k the members re-rank
        if shortlist:
            model, sl_opt, vocab, _ = evaluation.load_model(
                shortlist, data_path, vocab_path, device, feat_format, data_name=data_name,
                overrides=overrides)
            where = "--shortlist %s" % shortlist
            if not type(model).embeds_alone:
                raise errors.error("shortlist_unsupported", where, model=sl_opt.module_name,
                                   why=model.no_shortlist_why)
            theirs, ours = (os.path.join(o.data_path, o.data_name) for o in (sl_opt, opt))
            if os.path.realpath(theirs) != os.path.realpath(ours):
                raise errors.error("shortlist_split", where, theirs=theirs, ours=ours)
            self.shortlist = Member(shortlist, model, sl_opt, vocab,
                                    type(model).vocabulary(sl_opt)[1],
                                    "shortlist %s" % evaluation.model_labels(
                                        [shortlist], [sl_opt])[0])
        self.data_name = opt.data_name
        self.split_dir = os.path.join(opt.data_path, opt.data_name)
        self.digests = None
        if self.cache_dir:
            self._check_cache_dir(opt.data_path, paths + ([shortlist] if shortlist else []))
            try:
                os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
                reason = outputs.unwritable(self.cache_dir)
            except OSError as e:
                reason = errors.write_failure(e) or errors.first_line(e)
            if reason:  # the query is answered all the same, by encoding the split
                log.warning(errors.message("cache_unwritable", self.cache_dir, reason=reason))
                self.cache_dir = None
        if self.cache_dir:
            self.digests = Digests(self.cache_dir)
        self._loaders = {}
        for m in self.all_members:
            self._prepare(m)
        if self.digests:
            self.digests.save()

    # ------------------------------------------------------------------ cache
    def _check_cache_dir(self, data_path, paths):
        # a folder that holds the per-user cache base itself (the home directory) is no data
        # or checkpoint folder to keep the cache out of
        base = os.path.dirname(os.path.dirname(default_cache_dir()))
        for what, folder in ([("data folder", data_path)] +
                             [("checkpoint folder", os.path.dirname(os.path.abspath(p)))
                              for p in paths]):
            if _inside(self.cache_dir, folder) and not _inside(base, folder):
                raise errors.error("cache_inside", self.cache_dir, what=what, inside=folder,
                                   default=default_cache_dir())

    def _key(self, m):
        """(key, inputs): what the encodings of member m depend on, by content."""
        files = split_files(self.split_dir, self.split)
        if not files:  # no split: let the dataset say what is missing
            return None, None
        vocab = m.vocab_file
        vocab_files = ([vocab] if os.path.isfile(vocab) else
                       sorted(os.path.join(r, f) for r, _, fs in os.walk(vocab) for f in fs)
                       if os.path.isdir(vocab) else [])
        code = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        for src in sorted({inspect.getsourcefile(type(m.model))} |
                          {os.path.join(here, f) for f in ENCODING_CODE}):
            with open(src, "rb") as f:
                code.update(f.read())
        inputs = {
            "checkpoint": self.digests(m.path),
            "split": self.split,
            "split_files": {f: self.digests(os.path.join(self.split_dir, f)) for f in files},
            "vocabulary": [self.digests(f) for f in vocab_files],
            "matcher": "%s.%s %s" % (type(m.model).__module__, type(m.model).__name__,
                                     m.opt.module_name),
            "feat_format": getattr(m.opt, "feat_format", "auto"),
            "device": m.model.device.type,
            "torch": torch.__version__,
            "code": code.hexdigest(),
        }
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return key, inputs

    def _prepare(self, m):
        """The cached encodings of member m, or a loader to encode the split (which checks the
        split's files before any compute)."""
        if self.cache_dir:
            key, m.key_inputs = self._key(m)
            if key:
                m.entry = os.path.join(self.cache_dir, key[:40])
                if os.path.lexists(m.entry):
                    m.enc = Encodings.load(m.entry)
                    if m.enc is not None:
                        m.cached = True
                        log.info("retrieve: %s: the encodings of %s %s from the cache %s",
                                 m.label, self.data_name, self.split, m.entry)
                        return
                    record = outputs.made_record(m.entry)
                    if (record or {}).get("made_by") != TOOL:
                        raise errors.error("file_not_made", m.entry,
                                           tool=TOOL + "'s cache", flag="--cache_dir")
                    if record.get("format") == CACHE_FORMAT:  # an older format: re-encoded
                        why = Encodings.damage(m.entry, record) or "a file cannot be loaded"
                        log.warning(errors.message("cache_damaged", m.entry, why=why))
        m.loader = self._loader(m)

    def _loader(self, m):
        vkey = (type(m.model), tuple(sorted(getattr(m.vocab, "word2idx", {}).items())) or
                id(m.vocab))
        if vkey not in self._loaders:
            self._loaders[vkey] = data.get_test_loader(self.split, m.opt.data_name, m.vocab,
                                                       m.opt.batch_size, m.opt.workers, m.opt,
                                                       matcher=type(m.model))
        return self._loaders[vkey]

    def encodings(self, m, captions=False):
        """Member m's encodings of the split: cached, or encoded now (and cached). With
        `captions`, the captions' encodings are read: a cached file of them that is damaged
        is encoded again."""
        if m.enc is not None and captions:
            try:
                m.enc.cap_embs
            except CacheDamaged as e:
                log.warning(errors.message("cache_damaged", m.entry, why=e))
                m.enc, m.cached, m.loader = None, False, self._loader(m)
        if m.enc is None:
            dset = m.loader.dataset
            log.info("retrieve: %s: encoding %s %s (%d images, %d captions)", m.label,
                     self.data_name, self.split, m.n_images, len(dset))
            enc = evaluation.encode_data(m.model, m.loader, img_stride=dset.im_div)
            m.enc = Encodings.from_encoded(enc, dset.captions, dset.im_div,
                                           m.model.gallery_inputs(enc[0]))
            if m.entry:
                if os.path.lexists(m.entry):  # an incomplete entry of ours: replace it
                    shutil.rmtree(m.entry)
                meta = {"checkpoint": m.path, "data": self.split_dir, "inputs": m.key_inputs,
                        "created": time.strftime("%Y-%m-%d %H:%M:%S")}
                try:
                    saved = m.enc.save(m.entry, meta)
                except errors.SGRAFError as e:  # a full or read-only disk: answer uncached
                    if e.key != "write_failed":
                        raise
                    log.warning(errors.message("cache_unwritable", self.cache_dir,
                                               reason=e.fields["reason"]))
                    saved = False
                if saved:
                    size = sum(os.path.getsize(os.path.join(m.entry, f))
                               for f in os.listdir(m.entry))
                    log.info("retrieve: cached in %s (%.1f MB)", m.entry, size / 2 ** 20)
        return m.enc

    @property
    def n_images(self):
        return self.members[0].n_images

    @property
    def cached(self):
        return all(m.cached for m in self.all_members)

    @property
    def all_members(self):
        """The models that score (members) and the shortlist's, when there is one."""
        return self.members + ([self.shortlist] if self.shortlist else [])

    # ------------------------------------------------------------------ queries
    def _ensemble(self, scores):
        # as evaluation.evalrank: the sum over the models, divided by their number
        total = None
        for s in scores:
            total = s if total is None else total + s
        return total / len(scores)

    def _results(self, scores, topk):
        order = np.argsort(-scores, kind="stable")[:topk]
        return order, [{"rank": r + 1, "index": int(i), "score": float(scores[i]),
                        "stage": "exhaustive"} for r, i in enumerate(order)]

    def _meta(self, query):
        return {"query": query, "models": [m.path for m in self.members],
                "matchers": [m.opt.module_name for m in self.members],
                "data": self.split_dir, "split": self.split, "cached": self.cached,
                "two_stage": None}

    def _query(self, m, text):
        """Member m's encoding of free text: the context of its scores (and of --explain)."""
        q = m.model.query_batch(text, m.vocab)
        m.model.val_start()
        with torch.no_grad():
            cap_emb, lens = m.model.forward_text(q.captions, q.lengths, **q.extra)
        n_words = q.n_words if q.n_words is not None else len(
            [t for t in q.tokens if not _special(t)])
        return {"cap": cap_emb.float().cpu().numpy(), "lens": [int(n) for n in lens],
                "tokens": q.tokens, "unknown": q.unknown, "extra": q.extra, "n_words": n_words}

    def _text_scores(self, m, c, rows=None):
        """Member m's scores of its query c against the split's images (`rows`: those only,
        read from the memory-mapped encodings; None: all of them)."""
        enc = self.encodings(m)
        inputs = getattr(m.model, "score_inputs", {})
        if rows is None:
            img, sel = enc.all_images(), slice(None)
            extra = {k: (enc.extra[k] if where == "image" else c["extra"][k])
                     for k, where in inputs.items()}
        else:
            img, sel = np.asarray(enc.img_embs[rows]), rows
            extra = {k: (matrix.take(enc.extra[k], rows) if where == "image" else c["extra"][k])
                     for k, where in inputs.items()}
        return m.model.score(img, c["cap"], c["lens"], **extra,
                             **enc.gallery_rows(sel))[:, 0]

    def _image_scores(self, m, index, idx):
        """Member m's scores of the split's image `index` against its captions `idx`, in
        chunks of similar lengths."""
        enc = self.encodings(m, captions=True)
        inputs = getattr(m.model, "score_inputs", {})
        img = np.array(enc.img_embs[index:index + 1])
        idx = np.asarray(idx)
        s = np.empty(len(idx))
        order = np.argsort(enc.cap_lens[idx], kind="stable")  # chunks of similar lengths
        for start in range(0, len(order), CAPTION_CHUNK):
            pos = order[start:start + CAPTION_CHUNK]
            cols = idx[pos]
            extra = {k: (enc.extra[k][index:index + 1] if where == "image" else
                         [enc.extra[k][j] for j in cols]) for k, where in inputs.items()}
            s[pos] = m.model.score(img, enc.caption_block(cols),
                                   [int(x) for x in enc.cap_lens[cols]], **extra,
                                   **enc.gallery_rows(slice(index, index + 1)))[0]
        return s

    def search_text(self, text, topk=10):
        """The top `topk` images of the split for free text: Hits with each image's index, score
        and ground-truth captions, and the query's unknown words. With a shortlist: its top
        rerank_k images re-ranked by the members, then the rest in its order (`stage`)."""
        if text is None or not str(text).strip():
            raise errors.error("query_empty", "--query %s" % json.dumps(text or ""))
        context = [self._query(m, text) for m in self.members]
        if self.shortlist:
            order, results, two_stage, n = self._two_stage(
                "images", self._query(self.shortlist, text), topk,
                lambda rows: self._ensemble([self._text_scores(m, c, rows)
                                             for m, c in zip(self.members, context)]))
        else:
            scores = self._ensemble([self._text_scores(m, c)
                                     for m, c in zip(self.members, context)])
            order, results = self._results(scores, topk)
            two_stage, n = None, len(scores)
        enc = self.members[0].enc
        for r in results:
            i = r["index"]
            r["captions"] = enc.captions[i * enc.im_div:(i + 1) * enc.im_div]
        unknown = context[0]["unknown"]
        query = {"text": text, "tokens": context[0]["tokens"], "n_words": context[0]["n_words"],
                 "unknown": unknown, "n_unknown": len(unknown)}
        if len(self.members) > 1 and any(c["unknown"] != unknown for c in context):
            query["unknown_per_model"] = {m.label: c["unknown"]
                                          for m, c in zip(self.members, context)}
        hits = Hits(self._meta(query), results=results, n_gallery=n, gallery="images")
        hits["two_stage"] = two_stage
        hits.context = {"kind": "text", "members": context, "order": order}
        return hits

    def search_image(self, index, topk=10):
        """The top `topk` captions of the split for its image `index`: Hits with each caption's
        index, score, text and image (`match`: it is one of the query image's captions). With a
        shortlist: its top rerank_k captions re-ranked, then the rest in its order."""
        n = self.n_images
        if not 0 <= int(index) < n:
            raise errors.error("image_index", "--image %d" % index, split=self.split,
                               n_images=n, last=n - 1)
        index = int(index)
        if self.shortlist:
            qvec = self._vectors(self.shortlist, "images")[index]
            order, results, two_stage, n_gallery = self._two_stage(
                "captions", qvec, topk, lambda idx: self._ensemble(
                    [self._image_scores(m, index, idx) for m in self.members]))
        else:
            all_caps = np.arange(len(self.encodings(self.members[0], captions=True).cap_lens))
            scores = self._ensemble([self._image_scores(m, index, all_caps)
                                     for m in self.members])
            order, results = self._results(scores, topk)
            two_stage, n_gallery = None, len(scores)
        enc = self.members[0].enc
        for r in results:
            j = r["index"]
            r.update(text=enc.captions[j], image=j // enc.im_div, match=j // enc.im_div == index)
        query = {"image": index,
                 "captions": enc.captions[index * enc.im_div:(index + 1) * enc.im_div]}
        hits = Hits(self._meta(query), results=results, n_gallery=n_gallery,
                    gallery="captions")
        hits["two_stage"] = two_stage
        hits.context = {"kind": "image", "index": index, "order": order}
        return hits

    # ------------------------------------------------------------------ attention
    def check_explain(self, path, images=None, image_ids=None):
        """Everything --explain needs, before any compute: the output file, a matcher with
        attention, and for --images the image files (ImageFiles) and the region boxes."""
        if not hasattr(path, "write"):  # a file, not a buffer (serve.py's, in memory)
            outputs.check_outputs([path], TOOL + " --explain", "--explain")
        if all(type(m.model).attention_info is None for m in self.members):
            m = self.members[0]
            raise errors.error("explain_unsupported", "--explain", model=m.opt.module_name,
                               why=m.model.no_attention_why)
        if images is None:
            if image_ids is not None:
                raise errors.error("images_dir", "--images (needed by --image_ids)")
            return None
        return ImageFiles(images, image_ids, self.split_dir, self.split, self.n_images,
                          self.members[0].enc.im_div if self.members[0].enc else
                          self.members[0].loader.dataset.im_div)

    def attention(self, hits):
        """Per member with attention: (member, [(words, (L, R) weights) per result]); the pairs
        are (result image, query) for a text query, (query image, result caption) for an image
        query."""
        out = []
        for k, m in enumerate(self.members):
            if type(m.model).attention_info is None:
                continue
            enc = self.encodings(m, captions=True)
            idx = [r["index"] for r in hits["results"]]
            inputs = getattr(m.model, "score_inputs", {})
            if hits.context["kind"] == "text":
                c = hits.context["members"][k]
                caps = np.repeat(c["cap"], len(idx), axis=0)
                lens = c["lens"] * len(idx)
                extra = {key: ([enc.extra[key][i] for i in idx] if where == "image" else
                               list(c["extra"][key]) * len(idx))
                         for key, where in inputs.items()}
                weights = m.model.word_region_attention(np.array(enc.img_embs[idx]), caps,
                                                        lens, **extra)
                words = [c["tokens"]] * len(idx)
            else:
                i = hits.context["index"]
                caps = enc.caption_block(np.array(idx))
                lens = [int(enc.cap_lens[j]) for j in idx]
                extra = {key: ([enc.extra[key][i]] * len(idx) if where == "image" else
                               [enc.extra[key][j] for j in idx])
                         for key, where in inputs.items()}
                weights = m.model.word_region_attention(
                    np.repeat(np.array(enc.img_embs[i:i + 1]), len(idx), axis=0), caps, lens,
                    **extra)
                words = [m.model.query_batch(enc.captions[j], m.vocab).tokens for j in idx]
            words = [w if len(w) == len(a) else [str(p) for p in range(len(a))]
                     for w, a in zip(words, weights)]
            out.append((m, list(zip(words, weights))))
        return out

    def explain(self, hits, path, images=None, image_ids=None, files=None):
        """Draw, for the query and each result, the word x region attention weights of every
        model that has them (plots.attention_figure), and with `images` each word's most
        attended region on the image. Returns {"path", "attention": the (L, R) arrays as drawn
        (for each result, each model's), "words": their row labels, "rows": the panels}."""
        import plots
        files = files or self.check_explain(path, images, image_ids)
        maps = self.attention(hits)
        text = hits.context["kind"] == "text"
        rows = []
        for r_i, res in enumerate(hits["results"]):
            row = []
            for m, per_result in maps:
                words, weights = per_result[r_i]
                what = ("image %d" % res["index"] if text else "caption %d (image %d%s)" % (
                    res["index"], res["image"], ", the query's" if res["match"] else ""))
                row.append({"kind": "heatmap", "weights": weights, "words": words,
                            "title": "#%d %s, score %.4f%s" % (
                                res["rank"], what, res["score"],
                                "" if len(self.members) == 1 else "\n" + m.label)})
                if files is not None:
                    img_index = res["index"] if text else hits.context["index"]
                    row.append(files.panel(img_index, words, weights,
                                           "image %d: each word's most attended region"
                                           % img_index))
            rows.append(row)
        q = hits["query"]
        head = ('query "%s"' % q["text"] if text else
                "query: image %d (its first caption: \"%s\")" % (q["image"], q["captions"][0]))
        lines = ["%s, on %s %s" % (head, self.data_name, self.split)]
        for m in self.members:
            info = type(m.model).attention_info
            lines.append("%s: %s" % (m.label, info.format(opt=m.opt) if info is not None else
                                     "no word x region attention (%s)" % m.model.no_attention_why))
        drawn = plots.attention_figure(rows, "\n".join(lines), path)
        return {"path": path, "attention": drawn, "rows": rows,
                "words": [per[r][0] for r in range(len(rows)) for _, per in maps]}


class ImageFiles:
    """The split's image files (`--images DIR`, `--image_ids FILE`: one line per image of the
    split, or one per caption, each a file name under DIR, or an id found as DIR/<id>.jpg,
    DIR/<id>.png or COCO's DIR/*_<12-digit id>.jpg) and region boxes (`{split}_ims_bbx.npy`,
    (images, regions, 4) x1 y1 x2 y2 in pixels), checked when made; with `boxes=False` the
    boxes may be missing (`boxes` None: no region can be drawn)."""

    def __init__(self, images, image_ids, split_dir, split, n_images, im_div, boxes=True):
        if not os.path.isdir(images):
            raise errors.error("images_dir", images)
        ids = image_ids or os.path.join(split_dir, "%s_ids.txt" % split)
        if not os.path.isfile(ids):
            raise errors.error("image_ids_missing", ids)
        with open(ids, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) == n_images * im_div and im_div > 1:
            lines = lines[::im_div]
            step = im_div
        elif len(lines) == n_images:
            step = 1
        else:
            raise errors.error("image_ids_count", ids, n_lines=len(lines), n_images=n_images)
        names = set(os.listdir(images))
        self.paths = []
        for k, name in enumerate(lines):
            found = self._find(images, name, names)
            if found is None:
                raise errors.error("image_file", ids, image_id=name, line=k * step + 1,
                                   images=images, tried=", ".join(self._candidates(name)))
            self.paths.append(found)
        box_path = os.path.join(split_dir, "%s_ims_bbx.npy" % split)
        self.boxes = None
        if not boxes and not os.path.isfile(box_path):  # the files alone (serve.py's grid)
            return
        if not os.path.isfile(box_path):
            raise errors.error("boxes_missing", box_path, name=os.path.basename(box_path))
        self.boxes = np.load(box_path, mmap_mode="r")
        if self.boxes.ndim != 3 or self.boxes.shape[0] != n_images or self.boxes.shape[2] != 4:
            raise errors.error("boxes_shape", box_path, shape=tuple(self.boxes.shape),
                               n_images=n_images, regions="regions")

    @staticmethod
    def _candidates(name):
        out = [name]
        if name.isdigit():
            out += ["%s.jpg" % name, "%s.png" % name, "*_%012d.jpg" % int(name)]
        return out

    def _find(self, images, name, names):
        if os.path.isfile(os.path.join(images, name)):
            return os.path.join(images, name)
        if not name.isdigit():
            return None
        for cand in ("%s.jpg" % name, "%s.png" % name):
            if cand in names:
                return os.path.join(images, cand)
        suffix = "_%012d.jpg" % int(name)
        hits = [n for n in names if n.endswith(suffix)]
        return os.path.join(images, hits[0]) if hits else None

    def panel(self, index, words, weights, title):
        """The image with the most attended region of each word (words sharing a region share
        its box; the encoder's special tokens are left out)."""
        import matplotlib.image as mpimg
        boxes = np.asarray(self.boxes[index], dtype=np.float64)        # (R, 4)
        top = {}
        for w, row in zip(words, np.asarray(weights)):
            if _special(w):
                continue
            top.setdefault(int(np.argmax(row)), []).append(w)
        drawn = [tuple(boxes[r]) + (", ".join(ws),) for r, ws in sorted(top.items())
                 if r < len(boxes)]
        return {"kind": "image", "image": mpimg.imread(self.paths[index]), "boxes": drawn,
                "title": title}


# ----------------------------------------------------------------------------- output

def _mark(result):
    """A result past the re-ranked ones is marked (~) after its score."""
    return "~" if result.get("stage") == "shortlist" else " "


def format_table(hits):
    """The printed answer: a header, then one line per result (and the ground-truth captions
    of each image under it)."""
    q = hits["query"]
    lines = ["%s on %s (%s): %d %s" % (" + ".join(hits["matchers"]), hits["data"],
                                       hits["split"], hits["n_gallery"], hits["gallery"])]
    ts = hits.get("two_stage")
    if ts:
        lines.append(two_stage_line(ts, hits["gallery"]))
    if "text" in q:
        n_words = q["n_words"]
        unk = ("all known to the vocabulary" if not q["unknown"] else
               "%d not in the vocabulary, mapped to <unk>: %s"
               % (len(q["unknown"]), ", ".join(q["unknown"])))
        lines.append('query: "%s" (%d words; %s)' % (q["text"], n_words, unk))
        for label, words in q.get("unknown_per_model", {}).items():
            lines.append("  %s: %d unknown: %s" % (label, len(words), ", ".join(words)))
        lines.append("%4s  %6s  %10s  %s" % ("rank", "image", "score", "ground-truth captions"))
        for r in hits["results"]:
            caps = r["captions"] or [""]
            lines.append("%4d  %6d  %10.6f%s %s" % (r["rank"], r["index"], r["score"],
                                                    _mark(r), caps[0]))
            lines += ["%s  %s" % (" " * 24, c) for c in caps[1:]]
    else:
        lines.append("query: image %d; its captions:" % q["image"])
        lines += ["    %s" % c for c in q["captions"]]
        lines.append("%4s  %7s  %6s  %10s  %s" % ("rank", "caption", "image", "score",
                                                  "text (* a caption of the query image)"))
        for r in hits["results"]:
            lines.append("%4d  %7d  %6d  %10.6f%s %s%s" % (r["rank"], r["index"], r["image"],
                                                           r["score"], _mark(r),
                                                           "* " if r["match"] else "",
                                                           r["text"]))
    return "\n".join(lines)


def two_stage_line(ts, gallery):
    """The table's line on a two-stage answer: what shortlisted, how, what re-ranked."""
    line = ("two-stage: the top %d %s by the shortlist (%s, %s index%s) re-ranked by the "
            "scores above; the ranks past %d (marked ~) in the shortlist's order, with its score"
            % (ts["reranked"], gallery, ts["shortlist_matcher"], ts["index"],
               "" if ts["index_recall"] is None else
               ", approximate: recall@%d %.3f against flat on this query"
               % (ts["reranked"], ts["index_recall"]), ts["reranked"]))
    if ts["rerank_k"] > ts["reranked"]:
        line += "; K = %d is the whole gallery: this is the exhaustive ranking" % ts["rerank_k"]
    return line


def retrieve(model_path, query=None, image=None, topk=10, data_path=None, split="test",
             model_path2=None, vocab_path=None, data_name=None, device=None, feat_format=None,
             cache_dir="default", explain=None, images=None, image_ids=None, overrides=None,
             check_flags=False, shortlist=None, rerank_k=None, index="flat"):
    """One query (free text `query`, or the split's image index `image`) against the split:
    Hits ({"query", "results", ...}). `cache_dir`: "default" (default_cache_dir()), a
    directory, or None (no cache). `explain=PATH`: also draw the attention (hits["explain"]).
    `overrides`: the matchers' evaluation flags ({option: value}, as evaluation.evalrank);
    `check_flags` (the command line): refuse a --vocab_path that no model reads. `shortlist`,
    `rerank_k`, `index`: two-stage retrieval (Gallery)."""
    if (query is None) == (image is None):
        raise ValueError("give either query or image")
    if topk < 1:
        raise errors.error("flag_positive", "--topk %d" % topk)
    if query is not None and not str(query).strip():
        raise errors.error("query_empty", "--query %s" % json.dumps(query))
    shortlist_index.check_flags(shortlist, rerank_k, index)
    if explain:
        outputs.check_outputs([explain], TOOL + " --explain", "--explain")
    gallery = Gallery(model_path, data_path, split, model_path2, vocab_path, data_name, device,
                      feat_format, cache_dir, overrides, check_flags, shortlist=shortlist,
                      rerank_k=rerank_k, index=index)
    if image is not None and not 0 <= image < gallery.n_images:
        raise errors.error("image_index", "--image %d" % image, split=split,
                           n_images=gallery.n_images, last=gallery.n_images - 1)
    files = gallery.check_explain(explain, images, image_ids) if explain else None
    hits = (gallery.search_text(query, topk) if query is not None else
            gallery.search_image(image, topk))
    if explain:
        out = gallery.explain(hits, explain, files=files)
        hits["explain"] = out["path"]
        hits.context["explain"] = out
    if gallery.digests:
        gallery.digests.save()
    return hits


def add_gallery_flags(p, split_help, images_help):
    """The flags of a Gallery, shared by retrieve.py and serve.py: the checkpoint(s), the data,
    the cache, the image files, the device, the two-stage search and the matchers' evaluation
    flags (their dests in `p.matcher_dests`); `gallery_options` reads them back."""
    p.add_argument("--model_path", default=evaluation.DEFAULT_MODEL_PATH)
    p.add_argument("--model_path2", default=None,
                   help="a second checkpoint: rank by the mean of the two models' scores")
    p.add_argument("--data_path", default=evaluation.DEFAULT_DATA_PATH,
                   help="directory holding <data_name>/ (overrides the checkpoint's)")
    p.add_argument("--data_name", default=None, help="override the checkpoint's data_name")
    p.add_argument("--vocab_path", default=None, help="directory of <data_name>_vocab.json")
    p.add_argument("--split", default=evaluation.DEFAULT_SPLIT, help=split_help)
    p.add_argument("--cache_dir", default=default_cache_dir(),
                   help="where the split's encodings are cached (default %(default)s)")
    p.add_argument("--no_cache", action="store_true",
                   help="encode the split without reading or writing the cache")
    p.add_argument("--images", metavar="DIR", default=None, help=images_help)
    p.add_argument("--image_ids", metavar="FILE", default=None,
                   help="one line per image of the split: its file name under --images "
                        "(default: the split's {split}_ids.txt)")
    p.add_argument("--device", default=None, help="cuda or cpu")
    p.add_argument("--feat_format", default=None, choices=["auto", "npy", "h5"],
                   help="read {split}_ims.npy or {split}.h5 (default: the checkpoint's, auto)")
    t = p.add_argument_group("two-stage retrieval (docs/search.md#two-stage)")
    t.add_argument("--shortlist", metavar="CKPT", default=None,
                   help="a dual encoder's checkpoint (HREM): its top --rerank_k items are "
                        "re-ranked by --model_path (and --model_path2)")
    t.add_argument("--rerank_k", type=int, metavar="K", default=None,
                   help="with --shortlist: the candidates re-ranked per query")
    t.add_argument("--index", default="flat", choices=list(shortlist_index.KINDS),
                   help="the shortlist's search: flat (exact, the default), hnsw or ivf "
                        "(FAISS, approximate: their recall@K against flat is reported)")
    p.matcher_dests = matchers.add_eval_options(p)
    return p


def gallery_options(p, args):
    """Gallery's keyword arguments (but the model path) from the flags of add_gallery_flags."""
    return dict(data_path=args.data_path, split=args.split, model_path2=args.model_path2,
                vocab_path=args.vocab_path, data_name=args.data_name, device=args.device,
                feat_format=args.feat_format,
                cache_dir=None if args.no_cache else args.cache_dir,
                overrides={d: getattr(args, d) for d in p.matcher_dests
                           if getattr(args, d) is not None},
                check_flags=True, shortlist=args.shortlist, rerank_k=args.rerank_k,
                index=args.index)


def build_parser():
    """retrieve.py's flags; `.matcher_dests`: the matchers' evaluation flags among them."""
    p = errors.ArgumentParser(
        prog="retrieve.py",
        description="Search a split with a sentence (--query: its top images) or one of its "
                    "images (--image N: its top captions), with any checkpoint of the registry")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--query", help="free text: the split's images that match it best")
    g.add_argument("--image", type=int, metavar="N",
                   help="the split's image N: the split's captions that match it best")
    p.add_argument("--topk", type=int, default=10, help="number of results")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--explain", metavar="OUT.png", default=None,
                   help="draw the word x region attention of the query and each result")
    return add_gallery_flags(
        p, "the gallery: this split's images or captions (dev, test, testall)",
        "with --explain: the image files, to draw each word's most attended region (needs the "
        "split's {split}_ims_bbx.npy)")


@errors.exit_on_error
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if args.images and not args.explain:
        log.warning("retrieve: --images is used by --explain only")
    hits = retrieve(args.model_path, query=args.query, image=args.image, topk=args.topk,
                    explain=args.explain, images=args.images if args.explain else None,
                    image_ids=args.image_ids if args.explain else None,
                    **gallery_options(p, args))
    print(json.dumps(hits, ensure_ascii=False) if args.json else format_table(hits))
    if args.explain and not args.json:
        print("attention: %s" % hits["explain"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
