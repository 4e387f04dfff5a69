"""Convert SCAN region features `{split}_ims.npy` to HDF5 `{split}.h5` (dataset `feat`).

As the DAA code's np2h.py, so that training can read features lazily from HDF5; here the
conversion is chunked (a split is never read whole into RAM: Flickr30K train is 8.5 GB), checks
every value for NaN/Inf on the way, and writes atomically (a temporary file renamed at the end).

    python np2h.py --data_path data/f30k_precomp --splits train dev test
"""
import argparse
import logging
import os
import sys
import tempfile

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


class ConversionError(Exception):
    """A feature file that cannot be converted; the message names the file and the fix."""


def convert(npy_path, h5_path, chunk_images=256, overwrite=False):
    """Copy the (N, R, D) array of `npy_path` to dataset `feat` of `h5_path`, chunk by chunk.
    Returns the shape written."""
    import h5py
    if os.path.exists(h5_path) and not overwrite:
        raise ConversionError("%s exists; pass --overwrite to replace it" % h5_path)
    src = np.load(npy_path, mmap_mode="r")
    if src.ndim != 3:
        raise ConversionError("%s has shape %s, expected (images, regions, features)"
                              % (npy_path, src.shape))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".h5",
                               dir=os.path.dirname(os.path.abspath(h5_path)))
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            dst = f.create_dataset("feat", shape=src.shape, dtype=np.float32,
                                   chunks=(1,) + src.shape[1:])
            for start in tqdm(range(0, len(src), chunk_images), desc=os.path.basename(npy_path),
                              unit="chunk", disable=None):
                block = np.asarray(src[start:start + chunk_images], dtype=np.float32)
                finite = np.isfinite(block).reshape(len(block), -1).all(1)
                if not finite.all():
                    bad = start + int(np.argmin(finite))
                    raise ConversionError("%s: image %d holds NaN or Inf features; re-extract "
                                          "or re-download this file" % (npy_path, bad))
                dst[start:start + len(block)] = block
        os.replace(tmp, h5_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return src.shape


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert {split}_ims.npy to {split}.h5 (dataset feat)")
    p.add_argument("--data_path", default="data/f30k_precomp",
                   help="directory holding the {split}_ims.npy files")
    p.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    p.add_argument("--chunk", type=int, default=256, help="images per chunk")
    p.add_argument("--overwrite", action="store_true", help="replace existing .h5 files")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    for split in args.splits:
        npy = os.path.join(args.data_path, "%s_ims.npy" % split)
        h5 = os.path.join(args.data_path, "%s.h5" % split)
        if not os.path.isfile(npy):
            print("error: %s not found (expected {split}_ims.npy in --data_path)" % npy,
                  file=sys.stderr)
            return 2
        try:
            shape = convert(npy, h5, args.chunk, args.overwrite)
        except ConversionError as e:
            print("error: %s" % e, file=sys.stderr)
            return 2
        print("wrote %s %s" % (h5, shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
