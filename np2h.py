"""Convert SCAN region features `{split}_ims.npy` to HDF5 `{split}.h5` (dataset `feat`).

As the DAA code's np2h.py, so that training can read features lazily from HDF5; here the
conversion is chunked (a split is never read whole into RAM: Flickr30K train is 8.5 GB), checks
every value for NaN/Inf on the way, and writes atomically (a partial file renamed at the end;
the partial file of a killed conversion is removed by the next one). Every split is checked
before any is converted; an existing `.h5` is replaced only with `--overwrite`, except one that
np2h.py converted from the same `.npy` (unchanged since), which is up to date and skipped.

    python np2h.py --data_path data/f30k_precomp --splits train dev test
"""
import logging
import os
import sys

import numpy as np
from tqdm import tqdm

import data
import errors
import outputs

log = logging.getLogger(__name__)


def _source(npy_path):
    """What an .h5 was converted from, as np2h.py records it with the .h5."""
    st = os.stat(npy_path)
    return {"source": os.path.abspath(npy_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_split(npy_path, h5_path, overwrite=False):
    """Everything about converting one split that can be checked before converting it: the
    .npy is a readable 3-D float array with images, the .h5 can be written. Returns the
    features, or None when the .h5 is up to date (converted by np2h.py from this .npy)."""
    errors.check_not_dir(npy_path, npy_path, expected="a {split}_ims.npy file")
    if not os.path.isfile(npy_path):
        raise errors.error("features_missing", npy_path)
    record = outputs.check_output_file(h5_path, made_by="np2h.py", overwrite=overwrite,
                                       alternative="move it away")
    if record and not overwrite:
        if record.get("from") == _source(npy_path):
            return None
        raise errors.error("file_exists", h5_path, alternative="move it away",
                           detail=" (converted by np2h.py from another .npy)")
    src = data.open_features(npy_path)
    data.check_features(src, npy_path, sample=0)  # shape, dtype, images: no data read
    return src


def convert(npy_path, h5_path, chunk_images=256, overwrite=False):
    """Copy the (N, R, D) array of `npy_path` to dataset `feat` of `h5_path`, chunk by chunk.
    Returns the shape written."""
    src = check_split(npy_path, h5_path, overwrite)
    if src is None:  # up to date
        return data.H5Features(h5_path).shape
    return _write(src, npy_path, h5_path, chunk_images)


def _write(src, npy_path, h5_path, chunk_images):
    import h5py
    with outputs.atomic_output(h5_path, "np2h.py", **{"from": _source(npy_path)}) as tmp:
        with h5py.File(tmp, "w") as f:
            dst = f.create_dataset("feat", shape=src.shape, dtype=np.float32,
                                   chunks=(1,) + src.shape[1:])
            for start in tqdm(range(0, len(src), chunk_images), desc=os.path.basename(npy_path),
                              unit="chunk", disable=None):
                block = np.asarray(src[start:start + chunk_images], dtype=np.float32)
                finite = np.isfinite(block).reshape(len(block), -1).all(1)
                if not finite.all():
                    raise errors.error("features_nonfinite", npy_path,
                                       index=start + int(np.argmin(finite)),
                                       checked="found while converting it")
                dst[start:start + len(block)] = block
    return src.shape


def build_parser():
    p = errors.ArgumentParser(prog="np2h.py",
                              description="Convert {split}_ims.npy to {split}.h5 (dataset feat)")
    p.add_argument("--data_path", default="data/f30k_precomp",
                   help="directory holding the {split}_ims.npy files")
    p.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    p.add_argument("--chunk", type=int, default=256, help="images per chunk")
    p.add_argument("--overwrite", action="store_true", help="replace existing .h5 files")
    return p


@errors.exit_on_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    errors.check_positive(args, ["chunk"])
    errors.check_dir(args.data_path, "--data_path %s" % args.data_path,
                     expected="the directory that holds the {split}_ims.npy files, e.g. "
                              "data/f30k_precomp")
    for split in args.splits:  # "train,dev", "dev_ims.npy", "data/x/dev": not a split's name
        if not split or "," in split or "/" in split or os.sep in split or \
                split.endswith(".npy"):
            suggest = " ".join(s for part in split.replace(",", " ").split()
                               for s in [os.path.basename(part).replace(".npy", "")
                                         .replace("_ims", "")] if s) or "train dev test"
            raise errors.error("split_name", "--splits %s" % split, suggest=suggest)
    jobs = []
    for split in dict.fromkeys(args.splits):  # every split checked before any is converted
        npy = os.path.join(args.data_path, "%s_ims.npy" % split)
        h5 = os.path.join(args.data_path, "%s.h5" % split)
        jobs.append((npy, h5, check_split(npy, h5, args.overwrite)))
    for npy, h5, src in jobs:
        if src is None:
            print("%s is up to date (converted from %s)" % (h5, npy))
        else:
            print("wrote %s %s" % (h5, _write(src, npy, h5, args.chunk)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
