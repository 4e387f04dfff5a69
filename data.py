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
from checks import H5Features, open_features  # noqa: F401  (feature files, checked)
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
        checks.check_split_files(data_path, data_split, feat_path, cap_path)
        self.captions = read_captions(cap_path)
        self.images = open_features(feat_path)
        # shapes, caption count, empty lines, NaN on a sample, OOV rate: before any compute
        checks.check_split(self.images, self.captions, feat_path, cap_path, img_dim, vocab,
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
