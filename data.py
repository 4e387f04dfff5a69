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
"""
import logging
import os

import numpy as np
import torch
import torch.utils.data as data

import checks
from checks import DataError  # noqa: F401  (data.DataError: missing or malformed files)
from vocab import encode_caption

log = logging.getLogger(__name__)


def feature_path(loc, split, feat_format="auto"):
    """The feature file of a split: `{split}_ims.npy` or `{split}.h5`."""
    npy = os.path.join(loc, "%s_ims.npy" % split)
    h5 = os.path.join(loc, "%s.h5" % split)
    if feat_format == "npy" or (feat_format == "auto" and os.path.exists(npy)):
        return npy
    if feat_format == "h5" or (feat_format == "auto" and os.path.exists(h5)):
        return h5
    return npy


class H5Features:
    """Array-like view of `feat` in an HDF5 file, opened lazily in each process that reads it
    (an h5py handle must not cross a fork into DataLoader workers)."""

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
    """A read-only array of shape (N, R, img_dim) that does not load the file into RAM."""
    try:
        if path.endswith(".h5"):
            return H5Features(path)
        return np.load(path, mmap_mode="r")
    except Exception as e:  # a damaged header or a short file: whatever numpy or h5py raise
        raise checks.error("features_unreadable", path, reason=checks.first_line(e)) from None


def read_captions(path):
    """Caption lines of a split, stripped. Bytes that are not UTF-8 are replaced (U+FFFD,
    which then maps to <unk>) with a warning naming the first such line."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    captions, bad = [], []
    for i, line in enumerate(raw):
        try:
            captions.append(line.decode("utf-8").strip())
        except UnicodeDecodeError:
            captions.append(line.decode("utf-8", errors="replace").strip())
            bad.append(i + 1)
    if bad:
        log.warning(checks.message("caption_utf8", path, count=len(bad), line=bad[0]))
    return captions


class PrecompDataset(data.Dataset):
    """(image features, caption word ids, index, image index) for every caption of a split."""

    def __init__(self, data_path, data_split, vocab, feat_format="auto", img_dim=None):
        self.vocab = vocab
        self.split = data_split
        cap_path = os.path.join(data_path, "%s_caps.txt" % data_split)
        feat_path = feature_path(data_path, data_split, feat_format)
        checks.check_split_files(data_path, data_split, feat_path, cap_path)
        self.captions = read_captions(cap_path)
        self.images = open_features(feat_path)
        # shapes, caption count, empty lines, NaN on a sample, OOV rate: before any compute
        checks.check_split(self.images, self.captions, feat_path, cap_path, img_dim, vocab)
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


def collate_fn(data):
    """Batch (image, caption, index, img_id) tuples, sorted by caption length, longest first.
    Returns images (B, R, img_dim), captions (B, L) padded with 0, lengths (list), ids (list)."""
    data = sorted(data, key=lambda x: len(x[1]), reverse=True)
    images, captions, ids, img_ids = zip(*data)
    images = torch.stack(images, 0)
    lengths = [len(cap) for cap in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.int64)
    for i, cap in enumerate(captions):
        targets[i, :lengths[i]] = cap
    return images, targets, lengths, list(ids)


def get_precomp_loader(data_path, data_split, vocab, opt, batch_size=100, shuffle=True,
                       num_workers=2, sampler=None, generator=None):
    """`sampler`: a Sampler, or a function of the dataset that returns one (a
    DistributedSampler needs the dataset, which is built here)."""
    dset = PrecompDataset(data_path, data_split, vocab,
                          feat_format=getattr(opt, "feat_format", "auto"),
                          img_dim=getattr(opt, "img_dim", None))
    if callable(sampler) and not isinstance(sampler, torch.utils.data.Sampler):
        sampler = sampler(dset)
    on_cuda = str(getattr(opt, "device", "cpu")).startswith("cuda")
    return torch.utils.data.DataLoader(dataset=dset, batch_size=batch_size,
                                       shuffle=shuffle and sampler is None, sampler=sampler,
                                       pin_memory=on_cuda, num_workers=num_workers,
                                       collate_fn=collate_fn, generator=generator,
                                       persistent_workers=num_workers > 0)


def get_loaders(data_name, vocab, batch_size, workers, opt, train_sampler=None,
                generator=None):
    dpath = os.path.join(opt.data_path, data_name)
    train_loader = get_precomp_loader(dpath, "train", vocab, opt, batch_size, True, workers,
                                      sampler=train_sampler, generator=generator)
    val_loader = get_precomp_loader(dpath, "dev", vocab, opt, 100, False, workers)
    return train_loader, val_loader


def get_test_loader(split_name, data_name, vocab, batch_size, workers, opt):
    dpath = os.path.join(opt.data_path, data_name)
    return get_precomp_loader(dpath, split_name, vocab, opt, 100, False, workers)
