"""The `python checks.py` command: check feature files, print the troubleshooting table, convert
a checkpoint of the original python2.7 branch.

    python checks.py --features data/f30k_precomp/train_ims.npy   # every image finite, shape
    python checks.py --table > TROUBLESHOOTING.md                  # every error line (errors.py)
    python checks.py --convert-py2 OLD.pth.tar NEW.pth.tar         # python2.7-branch checkpoint

The checks themselves live beside what they guard: the error lines and the flag checks in
errors.py, the data's in data.py, the vocabulary's in vocab.py, the checkpoints' in
checkpoint.py, a training run's directory in runs.py.

What a command writes (the rule, the one writer, the one record of what this project made) is
outputs.py's.
"""
import logging
import os
import sys

import checkpoint
import data
import errors


# ----------------------------------------------------------------------------- the command

def build_parser():
    p = errors.ArgumentParser(prog="checks.py", description="SGRAF input checks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--table", action="store_true", help="print TROUBLESHOOTING.md")
    g.add_argument("--features", nargs="+", metavar="FILE",
                   help="check every image of feature files (.npy or .h5) for NaN/Inf, and "
                        "count the images with an all-zero region")
    g.add_argument("--convert-py2", nargs=2, metavar=("OLD", "NEW"),
                   help="re-save a checkpoint of the original python2.7 branch")
    p.add_argument("--img_dim", type=int, default=None, help="expected feature dimension")
    p.add_argument("--overwrite", action="store_true",
                   help="--convert-py2: replace NEW if it exists")
    return p


@errors.exit_on_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    errors.check_positive(args, ["img_dim"])
    if args.table:
        sys.stdout.write(errors.render_table())
    elif args.features:
        for path in args.features:
            errors.check_not_dir(path, path,
                                 expected="a feature file ({split}_ims.npy or {split}.h5)")
            if not os.path.isfile(path):
                raise errors.error("features_missing", path)
            images = data.open_features(path)
            data.check_features(images, path, args.img_dim, sample=0)
            bad, n_zero, first_zero = data.scan_features(images)
            if bad is not None:
                raise errors.error("features_nonfinite", path, index=bad,
                                   checked="all %d images checked" % len(images))
            print("%s: %s images of shape %s, all finite" % (path, len(images),
                                                             tuple(images.shape[1:])))
            if n_zero:
                print("warning: " + errors.message(
                    "features_zero_region", path, index=first_zero[0], region=first_zero[1],
                    checked="the first of %d such images" % n_zero))
    else:
        checkpoint.convert_py2_checkpoint(*args.convert_py2, overwrite=args.overwrite)
        print("wrote %s" % args.convert_py2[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
