"""retrieve.py's cache of a split's encodings: each model's encodings of a split
(evaluation.encode_data), kept in `--cache_dir` (default ~/.cache/sgraf/retrieve, or
$XDG_CACHE_HOME/sgraf/retrieve) as one entry per model and split, keyed by retrieve.Gallery by
the content of what they depend on. File digests are remembered by each file's inode, size,
mtime and ctime (`Digests`), so an unchanged file is not read again; a file changed within 2 s
of its hashing is hashed again. Each file of an entry is recorded with its size and crc32
(computed as it is written) and checked when read (`Encodings.load`, `Encodings.damage`).
"""
import io
import json
import logging
import os
import time

import numpy as np
import torch

import errors
import outputs

log = logging.getLogger(__name__)

TOOL = "retrieve.py"
CACHE_FORMAT = 2  # 2: each file's size and crc32 in the entry's record
RACY_NS = 2 * 10 ** 9  # a file changed this close to its hashing is hashed again next time
# the files whose code makes the encodings (besides the matcher's own file)
ENCODING_CODE = ("model.py", "data.py", "vocab.py", "evaluation.py")
# the files of a cache entry (and its record, .made_by.json, with each one's size and crc32);
# LAZY is checked when first read (a text query never reads the captions: 2/3 of the entry)
CACHE_FILES = ("images.npy", "captions.npy", "cap_lens.npy", "gallery.npz", "extra.pt",
               "meta.json")
LAZY = "captions.npy"


class CacheDamaged(Exception):
    """A file of a cache entry that does not match its size and crc32 (the reason)."""


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sgraf", "retrieve")


# ----------------------------------------------------------------------------- file digests

class Digests:
    """sha256 of files (outputs.file_digest), remembered (in `<cache_dir>/digests.json`) by each
    file's device, inode, size, mtime and ctime, so that an unchanged file is read once. A file
    whose ctime is within RACY_NS of its hashing is hashed again: a second change inside the
    same timestamp tick could leave all of its stat unchanged (git's "racy clean" rule)."""

    def __init__(self, cache_dir=None):
        self.path = os.path.join(cache_dir, "digests.json") if cache_dir else None
        self.files, self.dirty = {}, False
        if self.path and os.path.lexists(self.path):
            if outputs.made_by(self.path) != TOOL:
                raise errors.error("file_not_made", self.path, tool=TOOL + "'s cache",
                                   flag="--cache_dir")
            # as written (its size and crc32), or damaged: then every digest is computed again
            size, crc = outputs.file_crc32(self.path)
            if outputs.made_record(self.path).get("sums") == {"size": size, "crc32": crc}:
                with open(self.path, encoding="utf-8") as f:
                    self.files = json.load(f)["files"]
            else:
                self.dirty = True

    def __call__(self, path):
        real = os.path.realpath(path)
        st = os.stat(real)
        stat = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        known = self.files.get(real)
        if known and known["stat"] == stat and known["at"] - st.st_ctime_ns > RACY_NS:
            return known["sha256"]
        at = time.time_ns()
        digest = outputs.file_digest(real)
        self.files[real] = {"stat": stat, "at": at, "sha256": digest}
        self.dirty = True
        return digest

    def save(self):
        if self.path and self.dirty:
            sums = {}
            try:
                with outputs.atomic_output(self.path, TOOL, sums=sums) as tmp:
                    with open(tmp, "wb") as f:
                        summed = outputs.Summed(f)
                        summed.write(json.dumps({"files": self.files}).encode())
                    sums.update(summed.sums)
            except errors.SGRAFError as e:  # a full disk: the files are hashed again next time
                if e.key != "write_failed":
                    raise
                log.warning(errors.message("cache_unwritable", os.path.dirname(self.path),
                                           reason=e.fields["reason"]))
            self.dirty = False


def split_files(split_dir, split):
    """The files of a split in its directory: `{split}_*` and `{split}.*` (features, captions,
    and whatever else a matcher reads there: boxes, parses, ...)."""
    if not os.path.isdir(split_dir):
        return []
    return sorted(name for name in os.listdir(split_dir)
                  if (name.startswith(split + "_") or name.startswith(split + "."))
                  and os.path.isfile(os.path.join(split_dir, name)))


def _pack(x):
    """Batch extras as torch.load(weights_only=True) reads them back (numpy arrays as tensors);
    TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return type(x)(_pack(v) for v in x)
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _pack(v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str, torch.Tensor)):
        return x
    raise TypeError("cannot cache a %s" % type(x).__name__)


def _unpack(x):
    if isinstance(x, dict):
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        return {k: _unpack(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_unpack(v) for v in x)
    return x


class Encodings:
    """A split as one model encoded it (evaluation.encode_data): the images (N, R, d) or (N, d),
    the captions ragged (their words concatenated, (sum of lengths, d)) or global (C, d), the
    lengths, the `score_inputs` extras, and the caption texts."""

    def __init__(self, img_embs, cap_embs, cap_lens, extra, captions, im_div, gallery=None):
        self.img_embs = img_embs
        self._cap_embs = cap_embs         # (T, d) words of all captions, or (C, d) global
        self.unchecked = None             # (path, its recorded sums): checked when first read
        self.cap_lens = np.asarray(cap_lens, dtype=np.int64)
        self.ragged = cap_embs.ndim == 2 and img_embs.ndim == 3
        self.offsets = np.concatenate([[0], np.cumsum(self.cap_lens)]) if self.ragged else None
        self.extra = extra
        self.captions = list(captions)
        self.im_div = int(im_div)
        self.gallery = gallery or {}      # Matcher.gallery_inputs: {name: (n_images, ...)}

    @classmethod
    def from_encoded(cls, enc, captions, im_div, gallery=None):
        img_embs, cap_embs, cap_lens = enc
        if cap_embs.ndim == 3:  # per word, zero padded: keep the real words only
            cap_embs = np.concatenate([cap_embs[k, :n] for k, n in enumerate(cap_lens)])
        return cls(img_embs, cap_embs, cap_lens, enc.extra, captions[:len(cap_lens)], im_div,
                   gallery)

    @property
    def cap_embs(self):
        """The captions' encodings; CacheDamaged when their file (from a cache entry) does not
        match its recorded size and crc32 (checked once, when first read)."""
        if self.unchecked is not None:
            path, sums = self.unchecked
            why = _mismatch(path, sums)
            if why:
                raise CacheDamaged(why)
            self.unchecked = None
        return self._cap_embs

    def gallery_rows(self, rows):
        """The gallery inputs of some images (a slice or indices), for `score`."""
        return {k: np.asarray(v[rows]) for k, v in self.gallery.items()}

    @property
    def n_images(self):
        return len(self.img_embs)

    def all_images(self):
        """Every image's encoding in memory (a cache entry is memory-mapped: an image query
        reads one image, a text query all of them, once)."""
        if isinstance(self.img_embs, np.memmap):
            self.img_embs = np.array(self.img_embs)
        return self.img_embs

    def caption_block(self, idx):
        """The captions `idx` as `score` takes them: (len(idx), their longest, d) zero padded,
        or (len(idx), d)."""
        if not self.ragged:
            return self.cap_embs[idx]
        lens = self.cap_lens[idx]
        out = np.zeros((len(idx), int(lens.max()), self.cap_embs.shape[1]), dtype=np.float32)
        for k, j in enumerate(idx):
            out[k, :lens[k]] = self.cap_embs[self.offsets[j]:self.offsets[j + 1]]
        return out

    # ------------------------------------------------------------------ the cache
    def save(self, entry, meta):
        """Write the cache entry `entry` (a directory) through outputs.atomic_output, recorded
        as retrieve.py's with the cache's format. Returns False (nothing written) when an extra
        cannot be cached."""
        try:
            extra = _pack(self.extra)
        except TypeError as e:
            log.warning("retrieve: encodings not cached (%s)", e)
            return False
        sums = {}  # file -> {"size", "crc32"}, as written: recorded when the entry is whole

        def write(tmp, name, save):
            with open(os.path.join(tmp, name), "wb") as f:
                summed = outputs.Summed(f)
                save(summed)
            sums[name] = summed.sums

        def via_bytes(save):  # for the writers that seek (zip files)
            def write_bytes(f):
                buf = io.BytesIO()
                save(buf)
                f.write(buf.getbuffer())
            return write_bytes

        meta = json.dumps(dict(meta, im_div=self.im_div, captions=self.captions)).encode()
        try:
            with outputs.atomic_output(entry, TOOL, format=CACHE_FORMAT, files=sums) as tmp:
                os.mkdir(tmp)
                write(tmp, "images.npy", lambda f: np.save(f, self.img_embs))
                write(tmp, "captions.npy", lambda f: np.save(f, self.cap_embs))
                write(tmp, "cap_lens.npy", lambda f: np.save(f, self.cap_lens))
                write(tmp, "gallery.npz", via_bytes(lambda f: np.savez(f, **self.gallery)))
                write(tmp, "extra.pt", via_bytes(lambda f: torch.save(extra, f)))
                write(tmp, "meta.json", lambda f: f.write(meta))
        except OSError:
            if not os.path.isdir(entry):
                raise
            # another process wrote it meanwhile: keep theirs
        return True

    @classmethod
    def load(cls, entry):
        """The encodings of a cache entry, or None when it is not a complete entry of ours, or
        when a file of it does not match the size and crc32 recorded when it was written
        (checked before anything is read from it; LAZY's when first read: `cap_embs`)."""
        record = outputs.made_record(entry)
        if not record or record.get("made_by") != TOOL or record.get("format") != CACHE_FORMAT:
            return None
        if cls.damage(entry, record, lazy=False):
            return None
        try:
            with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            extra = torch.load(os.path.join(entry, "extra.pt"), weights_only=True)
            with np.load(os.path.join(entry, "gallery.npz")) as f:
                gallery = {k: f[k] for k in f.files}
            enc = cls(np.load(os.path.join(entry, "images.npy"), mmap_mode="r"),
                      np.load(os.path.join(entry, LAZY), mmap_mode="r"),
                      np.load(os.path.join(entry, "cap_lens.npy")), _unpack(extra),
                      meta["captions"], meta["im_div"], gallery)
            enc.unchecked = (os.path.join(entry, LAZY), record["files"][LAZY])
            return enc
        except (OSError, ValueError, KeyError, RuntimeError, EOFError):
            return None

    @staticmethod
    def damage(entry, record, lazy=True):
        """What is wrong with the files of a cache entry of the current format (`record`: its
        made_record), compared with the sizes and crc32 recorded as they were written (LAZY's
        only with `lazy`); None when every file is as written."""
        sums = record.get("files")
        if not isinstance(sums, dict) or set(sums) != set(CACHE_FILES):
            return "its record lists no checksum of its files"
        for name in CACHE_FILES:
            if name != LAZY or lazy:
                why = _mismatch(os.path.join(entry, name), sums[name])
                if why:
                    return why
        return None


def _mismatch(path, sums):
    """Why the file `path` is not as recorded (`sums`: its size and crc32), or None."""
    try:
        size, crc = outputs.file_crc32(path)
    except (OSError, ValueError) as e:
        return "%s cannot be read (%s)" % (os.path.basename(path), errors.first_line(e))
    if sums != {"size": size, "crc32": crc}:
        return "%s does not match its size and checksum" % os.path.basename(path)
    return None
