"""Data: SCAN precomputed region features and captions.

A dataset directory `<data_path>/<data_name>/` holds, per split (train, dev, test, testall):
  `{split}_ims.npy`  float32 (N, 36, img_dim) BUTD region features (or `{split}.h5`, dataset
                     `feat`, written by np2h.py)
  `{split}_caps.txt` one caption per line, UTF-8; 5 captions per image (lines 5i..5i+4 describe
                     image i), or 1 per image
Item k of a split is (image k // im_div, caption k), as in SCAN/SGRAF.

Differences from the original: features are memory-mapped (or read lazily from HDF5) instead of
read whole into RAM; `num_workers` is honoured; pinned memory only on CUDA; the dev split is
cut to its first 5000 captions only when it has more.

A split is checked when it is loaded, before any compute (`check_split_files`, `check_split`):
shapes and dtype from the header, the caption count and empty lines, NaN/Inf in a sample of
`N_SAMPLE_IMAGES` images (the files are up to 8 GB; `python checks.py --features FILE` checks
every image, as np2h.py does while it converts), and the share of out-of-vocabulary words.
Caption bytes that are not UTF-8 are replaced (U+FFFD, which maps to <unk>) with a warning
naming the first such line, not refused: a bad byte costs one word, and the line still holds
its caption, so no pair shifts. Empty lines are refused: an empty line is a lost caption, and
every later (image, caption) pair shifts.
"""
import logging
import os

import numpy as np
import torch
import torch.utils.data as data

import errors
from vocab import encode_caption, encode_caption_with_oov, read_lines

log = logging.getLogger(__name__)

# images whose features are checked for NaN/Inf at start-up, evenly spaced over the file
N_SAMPLE_IMAGES = 8
# captions tokenised for the out-of-vocabulary report when a split is loaded
N_SAMPLE_CAPTIONS = 5000
# above this share of <unk> tokens the vocabulary is probably of another dataset
OOV_WARN = 0.10
# from this share on, the vocabulary or the caption file's encoding is wrong: refused
OOV_REFUSE = 0.90


def feature_path(loc, split, feat_format="auto"):
    """The feature file of a split: `{split}_ims.npy` or `{split}.h5`."""
    npy = os.path.join(loc, "%s_ims.npy" % split)
    h5 = os.path.join(loc, "%s.h5" % split)
    if feat_format == "npy" or (feat_format == "auto" and os.path.exists(npy)):
        return npy
    if feat_format == "h5" or (feat_format == "auto" and os.path.exists(h5)):
        return h5
    return npy


def read_captions(path):
    """Caption lines of a split, stripped (vocab.read_lines: a byte-order mark is dropped).
    Bytes that are not UTF-8 are replaced (U+FFFD, which then maps to <unk>) with a warning
    naming the first such line."""
    captions, bad = read_lines(path)
    if bad:
        log.warning(errors.message("caption_utf8", path, count=len(bad), line=bad[0]))
    return captions


class H5Features:
    """Array-like view of `feat` in an HDF5 file (np2h.py), opened lazily in each process that
    reads it (an h5py handle must not cross a fork into DataLoader workers)."""

    def __init__(self, path):
        import h5py
        self.path = path
        with h5py.File(path, "r") as f:
            ds = f["feat"]
            self.shape, self.dtype = tuple(ds.shape), ds.dtype
        self._file = None
        self._pid = None

    def __len__(self):
        return self.shape[0]

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, idx):
        import h5py
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["feat"][idx]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state


def open_features(path):
    """A read-only array of shape (N, R, img_dim) that does not load the file into RAM
    (a memory-mapped `.npy`, or an `.h5`), or a DataError for a file that cannot be read."""
    try:
        if path.endswith(".h5"):
            return H5Features(path)
        return np.load(path, mmap_mode="r")
    except Exception as e:  # a damaged header or a short file: whatever numpy or h5py raise
        dtype = _pickled_dtype(path)
        if dtype is not None:
            raise errors.error("features_pickled", path, dtype=dtype) from None
        raise errors.error("features_unreadable", path, reason=errors.first_line(e)) from None


def _pickled_dtype(path):
    """The dtype of an .npy whose header is whole and says it holds Python objects (a pickled
    array, which np.load will not memory-map), or None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}[version]
            _, _, dtype = read(f)
    except Exception:  # not even its header can be read
        return None
    return str(dtype) if dtype.hasobject else None


# ----------------------------------------------------------------------------- checks of a split

def _expected(split):
    return "%s_ims.npy (or %s.h5) and %s_caps.txt" % (split, split, split)


def check_split_files(data_path, split, feat_path, cap_path):
    """The dataset directory and the two files of a split exist."""
    if not os.path.isdir(data_path):
        errors.check_dir(data_path, data_path, exists=False,
                         expected="the directory of the dataset")
        parent = os.path.dirname(os.path.normpath(data_path))
        if parent and os.path.isfile(os.path.join(parent, os.path.basename(cap_path))):
            # --data_path named the dataset's directory itself, not the one above it
            raise errors.error("data_dir_nested", data_path, parent=parent,
                               split=split, above=os.path.dirname(parent) or ".",
                               name=os.path.basename(parent))
        raise errors.error("data_dir", data_path, expected=_expected(split) + " (train and dev to "
                           "train; test or testall to evaluate)")
    for path in (feat_path, cap_path):
        errors.check_not_dir(path, path, expected="a file: move the directory away")
    missing = [os.path.basename(p) for p in (feat_path, cap_path) if not os.path.isfile(p)]
    if missing:
        found = sorted(n for n in os.listdir(data_path) if not n.startswith("."))  # as ls
        shown = ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")
        raise errors.error("split_missing", data_path, missing=" and ".join(missing),
                           found=shown or "nothing", expected=_expected(split))


def sample_indices(n, k=N_SAMPLE_IMAGES):
    """k image indices evenly spaced over n, first and last included."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))})


def check_features_finite(images, path, sample=N_SAMPLE_IMAGES, chunk=256):
    """No NaN/Inf in `images` (N, R, img_dim): a sample of images, or all (`sample=None`)."""
    n = len(images)
    if sample is not None:
        indices = sample_indices(n, sample) if sample else []
        for i in indices:
            if not np.isfinite(np.asarray(images[i], dtype=np.float32)).all():
                raise errors.error("features_nonfinite", path, index=i,
                                   checked="found in a sample of %d images" % len(indices))
        return
    bad, _, _ = scan_features(images, chunk)
    if bad is not None:
        raise errors.error("features_nonfinite", path, index=bad,
                           checked="all %d images checked" % n)


def scan_features(images, chunk=256):
    """One pass over every image: (the first image with NaN/Inf or None, the number of images
    with an all-zero region, the first (image, region) all zero or None)."""
    bad, n_zero, first_zero = None, 0, None
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float32)   # (b, R, img_dim)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if bad is None and not finite.all():
            bad = start + int(np.argmin(finite))
        zero = ~(block != 0).any(axis=2)                                   # (b, R)
        n_zero += int(zero.any(axis=1).sum())
        if first_zero is None and zero.any():
            i, r = np.argwhere(zero)[0]
            first_zero = (start + int(i), int(r))
    return bad, n_zero, first_zero


def warn_zero_regions(images, path, sample=N_SAMPLE_IMAGES):
    """An all-zero region vector in a sample of the training images: its embedding starts with
    norm 0 (the encoders' biases start at 0), where the l2 normalisation has no gradient, so
    training stops at the first batch that holds it. Warned, not refused: evaluation, and a
    resumed model (whose bias moved), are fine with it."""
    if images is None or getattr(images, "ndim", 0) != 3 or not len(images):
        return
    indices = sample_indices(len(images), sample)
    for i in indices:
        zero = ~(np.asarray(images[i]) != 0).any(axis=1)                   # (R,)
        if zero.any():
            log.warning(errors.message("features_zero_region", path, index=i,
                                       region=int(np.argmax(zero)),
                                       checked="found in a sample of %d images" % len(indices)))
            return


def check_features(images, path, img_dim=None, sample=N_SAMPLE_IMAGES, regions=None):
    """Shape and dtype from the header (no data read), then NaN/Inf on `sample` images (all
    with None, none with 0). `regions`: (count, why) when the model needs that many regions per
    image."""
    shape = tuple(images.shape)
    if len(shape) != 3:
        raise errors.error("features_ndim", path, shape=shape)
    if not np.issubdtype(images.dtype, np.floating):
        raise errors.error("features_dtype", path, dtype=images.dtype)
    if shape[0] == 0:
        raise errors.error("features_empty", path, shape=shape)
    if img_dim is not None and shape[2] != img_dim:
        raise errors.error("features_dim", path, dim=shape[2], img_dim=img_dim)
    if regions is not None and shape[1] != regions[0]:
        raise errors.error("features_regions", path, regions=shape[1], expected=regions[0],
                           why=regions[1])
    check_features_finite(images, path, sample)


def check_captions(captions, n_images, cap_path, feat_path):
    """5 or 1 captions per image, and no empty line."""
    empty = [i + 1 for i, c in enumerate(captions) if not c]
    if empty:
        raise errors.error("caption_empty", cap_path, line=empty[0], count=len(empty))
    if len(captions) not in (5 * n_images, n_images):
        raise errors.error("caption_count", cap_path, n_caps=len(captions), n_images=n_images,
                           n_five=5 * n_images, features=os.path.basename(feat_path))


def report_oov(captions, vocab, cap_path, max_captions=N_SAMPLE_CAPTIONS):
    """Log the share of caption tokens that map to <unk>, on an evenly spaced sample."""
    step = max(1, -(-len(captions) // max_captions))
    sample = captions[::step]
    n_tokens = n_oov = 0
    for caption in sample:
        ids, oov = encode_caption_with_oov(vocab, caption)
        n_tokens += len(ids) - 2
        n_oov += oov
    rate = 100.0 * n_oov / max(n_tokens, 1)
    what = ("all %d captions" % len(sample) if step == 1 else
            "a sample of %d of %d captions" % (len(sample), len(captions)))
    log.info(errors.message("oov", cap_path, rate=rate, n_oov=n_oov, n_tokens=n_tokens,
                            sample=what))
    if n_tokens and n_oov >= OOV_REFUSE * n_tokens:
        # UTF-16 without a byte-order mark reads as words with NUL bytes in them
        hint = (" (it holds NUL bytes: UTF-16 without a byte-order mark?)"
                if any("\x00" in c for c in sample) else "")
        raise errors.error("oov_refused", cap_path, rate=rate, vocab="(%d words)" % len(vocab),
                           hint=hint)
    if rate > 100 * OOV_WARN:
        log.warning(errors.message("oov_high", cap_path, rate=rate,
                                   vocab="(%d words)" % len(vocab)))
    return rate


def check_split(images, captions, feat_path, cap_path, img_dim=None, vocab=None, regions=None):
    """Everything about a loaded split that is cheap to check; reports the OOV rate."""
    check_features(images, feat_path, img_dim, regions=regions)
    if vocab is not None and any("\x00" in c for c in captions[:5]):
        report_oov(captions, vocab, cap_path)  # UTF-16: say so before the count is wrong
    check_captions(captions, len(images), cap_path, feat_path)
    if vocab is not None:
        report_oov(captions, vocab, cap_path)


def check_last_batch(n_captions, batch_size):
    """A shuffled epoch whose last batch holds one pair crashes in BatchNorm1d at the end of
    the first epoch; say so before training."""
    if batch_size > 1 and n_captions % batch_size == 1:
        suggest = next(b for b in (batch_size - 1, batch_size + 1, batch_size + 2)
                       if n_captions % b != 1)
        raise errors.error("batch_remainder", "--batch_size %d" % batch_size, n=n_captions,
                           suggest=suggest)


def check_fold5(fold5, n_images, split, n_caps=None, needed=5000):
    """COCO 5-fold 1K: 5000 images (`needed`) with their 25000 captions (five folds of
    1000 x 5000)."""
    n_caps = 5 * n_images if n_caps is None else n_caps
    if fold5 and (n_images != needed or n_caps != 5 * needed):
        raise errors.error("fold5", "--fold5", split=split, n_images=n_images, n_caps=n_caps,
                           needed=needed)


def check_eval_captions(n_images, n_caps, where):
    """R@K (i2t, t2i) reads captions 5i..5i+4 as those of image i."""
    if n_caps != 5 * n_images:
        raise errors.error("eval_captions", where, n_images=n_images, n_caps=n_caps)


# ----------------------------------------------------------------------------- datasets

class PrecompDataset(data.Dataset):
    """(image features, caption word ids, index, image index) for every caption of a split.
    `regions`: (count, why) when the model needs that many regions per image (checked at
    start-up with the rest of the split)."""

    def __init__(self, data_path, data_split, vocab, feat_format="auto", img_dim=None,
                 regions=None):
        self.vocab = vocab
        self.split = data_split
        self.data_path = data_path
        cap_path = os.path.join(data_path, "%s_caps.txt" % data_split)
        feat_path = feature_path(data_path, data_split, feat_format)
        check_split_files(data_path, data_split, feat_path, cap_path)
        self.files = [feat_path, cap_path]  # what the split is read from
        self.captions = read_captions(cap_path)
        self.images = open_features(feat_path)
        self.feat_path, self.cap_path = feat_path, cap_path
        # shapes, caption count, empty lines, NaN on a sample, OOV rate: before any compute
        check_split(self.images, self.captions, feat_path, cap_path, img_dim, vocab,
                    regions=regions)
        self.length = len(self.captions)
        # SCAN data repeats each image for its 5 captions
        self.im_div = 5 if len(self.images) != self.length else 1
        # the dev set of COCO is large: validate on its first 5000 captions, as the original
        if data_split == "dev" and self.length > 5000:
            self.length = 5000

    def __getitem__(self, index):
        img_id = index // self.im_div
        image = torch.from_numpy(np.array(self.images[img_id], dtype=np.float32))
        target = torch.tensor(encode_caption(self.vocab, self.captions[index]), dtype=torch.int64)
        return image, target, index, img_id

    def __len__(self):
        return self.length


class Batch:
    """A collated batch: the original four, `images` (B, R, img_dim), `captions` (B, L) padded
    with 0, `lengths` (list) and `ids` (the captions' indices in the split, list), plus whatever
    a matcher's collate adds in `extra` (also readable as attributes: e.g. `batch.img_ids`).
    It unpacks as the original 4-tuple: `images, captions, lengths, ids = batch`; a train step
    is called as `model.train_emb(*batch, **batch.extra)`."""

    def __init__(self, images, captions, lengths, ids, **extra):
        self.images, self.captions, self.lengths, self.ids = images, captions, lengths, ids
        self.extra = extra

    def __iter__(self):
        return iter((self.images, self.captions, self.lengths, self.ids))

    def __len__(self):
        return len(self.ids)

    def __getattr__(self, name):
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)


def collate_fn(data):
    """Batch (image, caption, index, img_id) tuples, sorted by caption length, longest first.
    Returns a Batch: images (B, R, img_dim), captions (B, L) padded with 0, lengths (list),
    ids (list), and img_ids (list) in `extra`."""
    data = sorted(data, key=lambda x: len(x[1]), reverse=True)
    images, captions, ids, img_ids = zip(*data)
    images = torch.stack(images, 0)
    lengths = [len(cap) for cap in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.int64)
    for i, cap in enumerate(captions):
        targets[i, :lengths[i]] = cap
    return Batch(images, targets, lengths, list(ids), img_ids=list(img_ids))


def precomp_dataset(data_path, split, vocab, opt, train=False):
    """The default dataset of a matcher (`Matcher.dataset`): PrecompDataset with the flags'
    feature format and dimension."""
    return PrecompDataset(data_path, split, vocab, feat_format=getattr(opt, "feat_format", "auto"),
                          img_dim=getattr(opt, "img_dim", None))


def get_precomp_loader(data_path, data_split, vocab, opt, batch_size=100, shuffle=True,
                       num_workers=2, sampler=None, generator=None, matcher=None, train=False):
    """`sampler`: a Sampler, or a function of the dataset that returns one (a
    DistributedSampler needs the dataset, which is built here). `matcher`: the model's class,
    which makes its dataset (`matcher.dataset`) and batches (`matcher.collate_fn`, and
    `matcher.drop_last` in training); without it, PrecompDataset and collate_fn."""
    if matcher is None:
        dset = precomp_dataset(data_path, data_split, vocab, opt, train)
        collate, drop_last = collate_fn, False
    else:
        dset = matcher.dataset(data_path, data_split, vocab, opt, train=train)
        collate, drop_last = matcher.collate_fn, train and matcher.drop_last
    if callable(sampler) and not isinstance(sampler, torch.utils.data.Sampler):
        sampler = sampler(dset)
    on_cuda = str(getattr(opt, "device", "cpu")).startswith("cuda")
    return torch.utils.data.DataLoader(dataset=dset, batch_size=batch_size,
                                       shuffle=shuffle and sampler is None, sampler=sampler,
                                       pin_memory=on_cuda, num_workers=num_workers,
                                       collate_fn=collate, generator=generator,
                                       drop_last=drop_last, persistent_workers=num_workers > 0)


def get_loaders(data_name, vocab, batch_size, workers, opt, train_sampler=None,
                generator=None, matcher=None):
    dpath = os.path.join(opt.data_path, data_name)
    train_loader = get_precomp_loader(dpath, "train", vocab, opt, batch_size, True, workers,
                                      sampler=train_sampler, generator=generator,
                                      matcher=matcher, train=True)
    val_loader = get_precomp_loader(dpath, getattr(opt, "val_split", None) or "dev", vocab, opt, 100,
                                    False, workers, matcher=matcher)
    return train_loader, val_loader


def get_test_loader(split_name, data_name, vocab, batch_size, workers, opt, matcher=None):
    dpath = os.path.join(opt.data_path, data_name)
    return get_precomp_loader(dpath, split_name, vocab, opt, 100, False, workers,
                              matcher=matcher)
