"""The similarity matrix at scale: the similarity matrix cut into shards of image and caption blocks
(the same grid whoever scores it, so 1 and N processes give the same matrix), scoring a shard
with one model or an ensemble, the non-finite checks of what is scored, and the `--save_sims`
file: the matrix written as it is scored, with a record of what determines it and a checksum
per shard, so that a killed evaluation continues and a damaged shard is scored again.
"""
import hashlib
import io
import json
import logging
import os
import zlib

import numpy as np
import torch

import distributed
import errors
import outputs

log = logging.getLogger(__name__)

FOLDS, FOLD_IMAGES = 5, 1000  # COCO's 5-fold 1K protocol (--fold5)


def nonfinite_rows(x):
    """The rows of `x` holding NaN or Inf (one pass over it when there is none)."""
    if np.isfinite(np.sum(x)):  # (an overflow only sends it to the exact check)
        return []
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)).tolist()


def indices_text(rows, most=6):
    shown = ", ".join(str(r) for r in rows[:most])
    return shown + (" ... (%d in all)" % len(rows) if len(rows) > most else "")



def check_scores(scores, images, captions, where="the similarity matrix"):
    """No NaN or Inf in scores: a DataError naming their images and captions. `images`,
    `captions`: each score's image and caption, arrays broadcastable to the scores' shape (a
    shard's rows and columns, or a vector of pairs' own)."""
    if np.isfinite(np.sum(scores)):
        return
    bad = ~np.isfinite(scores)
    raise errors.error(
        "scores_nonfinite", where,
        images=indices_text(np.unique(np.broadcast_to(images, bad.shape)[bad]).tolist()),
        captions=indices_text(np.unique(np.broadcast_to(captions, bad.shape)[bad]).tolist()))


def check_block(block, shard):
    """check_scores of a shard's block."""
    i0, i1, j0, j1 = shard
    check_scores(block, np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :])


# ----------------------------------------------------------------------------- shards

# Scoring is cut into shards of at most IMAGE_BLOCK images x CAPTION_BLOCK captions, and each
# side into MIN_BLOCKS blocks where that leaves blocks of IMAGE_MIN images and CAPTION_MIN
# captions or more: Flickr30K's test split is 10 x 10 shards of 100 x 500, 100 images x 500
# captions 8 x 8 shards, a split of 10 images one shard (tiny shards cost more in per-call
# overhead than they save). The grid depends on the matrix only, not on the number of
# processes: every shard is scored the same way whoever scores it, so 1 and N processes give
# the same matrix, and a rerun with another number of processes continues a --save_sims file.
IMAGE_BLOCK, CAPTION_BLOCK, MIN_BLOCKS, IMAGE_MIN, CAPTION_MIN = 100, 500, 8, 10, 50


def _blocks(start, stop, least, most):
    size = min(most, max(least, -(-(stop - start) // MIN_BLOCKS)))
    return [(b, min(b + size, stop)) for b in range(start, stop, size)]


def score_regions(n_img, n_cap, fold5=False):
    """The parts of the (n_img, n_cap) matrix that are scored: all of it, or with `fold5` the
    five diagonal 1000 x 5000 folds (the original's COCO 1K: 25M pairs instead of 125M)."""
    if fold5:
        n = FOLD_IMAGES
        return [(k * n, (k + 1) * n, 5 * k * n, 5 * (k + 1) * n) for k in range(FOLDS)]
    return [(0, n_img, 0, n_cap)]


def shard_grid(regions):
    """[(i0, i1, j0, j1)]: images i0..i1-1 x captions j0..j1-1 for every shard of the
    regions."""
    return [(i0, i1, j0, j1) for r0, r1, c0, c1 in regions
            for i0, i1 in _blocks(r0, r1, IMAGE_MIN, IMAGE_BLOCK)
            for j0, j1 in _blocks(c0, c1, CAPTION_MIN, CAPTION_BLOCK)]


def _pairs(shard):
    i0, i1, j0, j1 = shard
    return (i1 - i0) * (j1 - j0)


def take(seq, idx):
    """seq[idx] for a slice, or the items at an array of indices (lists, arrays and tensors
    alike)."""
    if isinstance(idx, slice) or isinstance(seq, np.ndarray):
        return seq[idx]
    if isinstance(seq, torch.Tensor):
        return seq[torch.as_tensor(idx)]
    return [seq[k] for k in idx]


def score_block(scorers, rows, cols, precomputed=None):
    """The mean of the models' scores of images `rows` x captions `cols` (slices, or arrays of
    indices), float64, and each model's own scores. Each scorer is (model, encoded split); a
    model sees that block only, through its `score`. `precomputed`: per scorer, what its
    `gallery_inputs` and `caption_inputs` computed for the split's images and captions
    (passed for `rows` and `cols`)."""
    sims, own = None, []
    for k_model, (model, enc) in enumerate(scorers):
        inputs = getattr(model, "score_inputs", {})
        extra = {k: take(enc.extra[k], rows if where == "image" else cols)
                 for k, where in inputs.items()}
        if precomputed is not None:
            by_image, by_caption = precomputed[k_model]
            extra.update({k: take(v, rows) for k, v in by_image.items()})
            extra.update({k: take(v, cols) for k, v in by_caption.items()})
        img_embs, cap_embs, cap_lens = enc
        s = model.score(take(img_embs, rows), take(cap_embs, cols), take(cap_lens, cols),
                        **extra)
        sims = s if sims is None else sims + s
        own.append(s)
    return sims / len(scorers), own


def score_shard(scorers, shard):
    """score_block of one shard (i0, i1, j0, j1): images i0..i1-1 x captions j0..j1-1."""
    i0, i1, j0, j1 = shard
    return score_block(scorers, slice(i0, i1), slice(j0, j1))


def deal(todo, size, compute, write, commit=None, bar=None):
    """Work shared by the processes of a torchrun launch, whose results rank 0 writes: the
    units `todo` are dealt out in rounds, one per process, largest `size(k)` first (stable:
    their order among equals), so that every process gets an equal share and a round's units
    are of a size; rank 0 gathers each round's `compute(k)`, calls `write(k, result)` for
    each, then `commit(ks)` (a --save_sims record) and advances `bar` by their sizes."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    order = sorted(todo, key=lambda k: -size(k))
    for start in range(0, len(order), world):
        batch = order[start:start + world]
        results = distributed.gather(compute(batch[rank]) if rank < len(batch) else None)
        if rank != 0:
            continue
        for k, result in zip(batch, results):
            write(k, result)
        if commit is not None:
            commit(batch)
        if bar is not None:
            bar.update(sum(size(k) for k in batch))


def score_shards(scorers, shards, todo, out, commit=None, bar=None, each=False, own=None):
    """Score the shards `todo` (indices into `shards`) and write each into `out` (rank 0's
    matrix), shared out by `deal` under torchrun; each shard's scores are checked (no NaN or
    Inf) before they are written. `each`: also each model's own block, written into `own`
    (rank 0's list of matrices, one per model); `out` None: only those."""
    def compute(k):
        block, blocks_own = score_shard(scorers, shards[k])
        return block, (blocks_own if each else None)  # the models' own blocks stay home

    def write(k, result):
        block, blocks_own = result
        check_block(block, shards[k])
        i0, i1, j0, j1 = shards[k]
        if out is not None:
            out[i0:i1, j0:j1] = block
        for m, b in zip(own or [], blocks_own or []):
            m[i0:i1, j0:j1] = b

    with quiet(scorers):
        deal(todo, lambda k: _pairs(shards[k]), compute, write, commit, bar)


class quiet:
    """`with quiet(scorers):` the models show no bar of their own (one bar over all the pairs
    is shown instead)."""

    def __init__(self, scorers):
        self.models = [model for model, _ in scorers]

    def __enter__(self):
        for model in self.models:
            model.show_progress = False

    def __exit__(self, *exc):
        for model in self.models:
            model.show_progress = True


# ----------------------------------------------------------------------------- --save_sims

def sims_path(path):
    """`--save_sims` as np.save names it: `.npy` appended when missing."""
    return path if path.endswith(".npy") else path + ".npy"


def sims_identity(loaded, datasets, split, fold5, shape, grid, overrides=None):
    """What determines the matrix, for the --save_sims record: the checkpoints' and the
    split's files by content (sha256), the vocabularies, and the options that change
    scores (precision, the matchers' evaluation flags given). `loaded`: [(model, opt,
    checkpoint path)]; `datasets`: the split as each model reads it (their `files`)."""
    ident = {}
    for k, (model, opt, path) in enumerate(loaded):
        tag = "checkpoint" if k == 0 else "checkpoint%d" % (k + 1)
        ident[tag + " sha256"] = outputs.file_digest(path)
        vocab_file = getattr(opt, "vocab_file", None)
        if vocab_file and os.path.isfile(vocab_file):
            ident[tag + " vocabulary sha256"] = outputs.file_digest(vocab_file)
        ident[tag + " precision"] = getattr(model.opt, "precision", None) or "fp32"
    for k, v in sorted((overrides or {}).items()):
        ident["--" + k] = v if isinstance(v, (bool, int, float, str)) else repr(v)
    ident["split"] = split
    for dset in datasets:
        for f in getattr(dset, "files", None) or [os.path.join(getattr(dset, "data_path", "?"),
                                                               split)]:
            key = os.path.basename(f) + " sha256"
            if key not in ident:
                ident[key] = outputs.file_digest(f) if os.path.isfile(f) else f
    ident["device"] = torch.device(loaded[0][0].device).type
    ident["fold5"] = bool(fold5)
    ident["shape"] = list(shape)
    # the record's shard numbers index this grid
    ident["shard grid sha256"] = hashlib.sha256(json.dumps(grid).encode()).hexdigest()
    return ident


def _shard_sums(entry, n_shards):
    """[(shard, crc32)] of a record entry `{"done": [k, ...], "crc32": [c, ...]}`, or None for
    a line of another shape (damaged, or of a version that kept no checksums)."""
    if not isinstance(entry, dict) or set(entry) != {"done", "crc32"}:
        return None
    done, sums = entry["done"], entry["crc32"]
    if not (isinstance(done, list) and isinstance(sums, list) and len(done) == len(sums)):
        return None
    if not all(type(k) is int and 0 <= k < n_shards for k in done) or \
            not all(type(c) is int for c in sums):
        return None
    return list(zip(done, sums))


def _block_crc32(sims, shard):
    i0, i1, j0, j1 = shard
    return zlib.crc32(np.ascontiguousarray(sims[i0:i1, j0:j1]))


class SavedSims:
    """The --save_sims matrix, written as it is scored: a memory-mapped float64 .npy (NaN where
    nothing is scored yet, e.g. outside the folds of --fold5) and the record of the finished
    shards beside it (outputs.OutputRecord), each with the crc32 of its scores. A shard's
    scores reach the disk before the shard is recorded, so the record never names a shard that
    a crash lost; rerunning the command continues from the recorded shards whose scores still
    match their checksum, and scores the others again (one warning line says how many).
    Rank 0 only: made before the evaluation, so that it is closed whatever happens; nothing is
    read or written before `claim`."""

    def __init__(self, path, overwrite=False):
        self.path, self.overwrite = path, overwrite
        self.record, self.sims, self.shape, self.done = None, None, None, set()
        self.grid = None

    def claim(self, identity, shape, grid, info=None):
        """The file for the evaluation `identity` (its shards `grid`): a fresh matrix, or the
        one an earlier run of the same evaluation left; returns the shards already scored."""
        self.claim_record(identity, info)
        return self.open(shape, grid)

    def claim_record(self, identity, info=None):
        """The first half of `claim`: the record, refused (nothing written) when the file is
        another evaluation's; its entries say what an earlier run of this one finished."""
        self.record = outputs.claim_output(self.path, identity, "--save_sims",
                                           made_by="evaluation.py --save_sims",
                                           overwrite=self.overwrite, info=info)
        return self.record

    def open(self, shape, grid):
        """The second half of `claim`, once the record is claimed: the matrix of `shape` whose
        shards are `grid`; returns the shards already scored (their checksums hold)."""
        record = self.record
        self.shape, self.grid = tuple(shape), grid
        try:
            ready = any(e == {"ready": True} for e in record.entries)
            sums, damaged = {}, 0
            for e in record.entries:
                if e == {"ready": True} or (isinstance(e, dict) and set(e) == {"attached"}):
                    continue
                found = _shard_sums(e, len(grid))
                if found is None:
                    damaged += 1
                else:
                    sums.update(found)  # a shard scored again: its latest checksum
            self.done = set()
            if ready:
                self.sims = self._open()
                self.done = {k for k, c in sums.items() if _block_crc32(self.sims, grid[k]) == c}
                if damaged or len(self.done) < len(sums):
                    self._warn(len(sums) - len(self.done), len(sums), damaged)
            else:  # fresh, or the earlier run stopped before the file was made
                if sums or damaged:  # its "ready" line is damaged: all of it is scored again
                    self._warn(len(sums), len(sums), damaged)
                self.sims = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float64,
                                                      shape=self.shape)
                self.sims[:] = np.nan
                self.sims.flush()
                record.append({"ready": True})
        except BaseException:
            self.record = None
            record.close()
            raise
        return self.done

    def _warn(self, n, n_recorded, damaged):
        lines = ", and %d record line(s) are damaged" % damaged if damaged else ""
        log.warning(errors.message("sims_rescored", self.path, n=n, n_recorded=n_recorded,
                                   lines=lines,
                                   record=os.path.basename(self.record.record_path)))

    def _other_array(self, f):
        """Whether `f` starts with a whole .npy header of another array (not a damaged one)."""
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read(f)
        except Exception:  # a damaged header: whatever numpy raises for it
            return False
        return (tuple(shape), fortran, dtype) != (self.shape, False, np.dtype(np.float64))

    def _header(self):
        """The .npy header open_memmap writes for the matrix."""
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(
            np.dtype(np.float64)), "fortran_order": False, "shape": self.shape})
        return buf.getvalue()

    def _open(self):
        """The matrix an earlier run wrote, opened for writing without trusting its size or its
        header: those are the record's (a damaged header is written again, a longer file cut,
        a shorter one completed with NaN, never silently with zeros); the shards' checksums
        then say which scores survived."""
        header = self._header()
        size = len(header) + 8 * self.shape[0] * self.shape[1]
        not_ours = errors.error("output_not_ours", self.path, flag="--save_sims",
                                why="it does not hold the (%d, %d) float64 matrix its record "
                                    "describes" % self.shape)
        try:
            with open(self.path, "r+b") as f:
                if f.read(len(header)) != header:
                    if self._other_array(f):  # an .npy of the user's, saved over ours
                        raise not_ours
                    f.seek(0)
                    f.write(header)
                found = os.fstat(f.fileno()).st_size
                if found != size:
                    f.truncate(size)
            sims = np.lib.format.open_memmap(self.path, mode="r+")
        except (OSError, ValueError):
            raise not_ours from None
        if found < size:  # the part cut off (and the value it cut) is unscored
            sims.reshape(-1)[max(0, found - len(header)) // 8:] = np.nan
            sims.flush()
        return sims

    def commit(self, shards):
        """The shards' scores are on disk (msync), then recorded (fsync) with their checksums."""
        self.sims.flush()
        self.record.append({"done": list(shards),
                            "crc32": [_block_crc32(self.sims, self.grid[k]) for k in shards]})

    def close(self):
        if self.record is not None:
            self.record.close()
