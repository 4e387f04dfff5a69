"""The whole job in a few minutes on a laptop CPU, with no dataset to download.

Generates the synthetic SCAN-format dataset (synthetic.py) if it is missing, trains a small
model of any matcher of the registry (SGR by default, `--module_name` for the others) with
train.py, and evaluates the best checkpoint on the test split with evaluation.py, printing the
original result lines next to those of the same model before training.

    python demo.py                      # SGR
    python demo.py --module_name SAF
    python demo.py --module_name NAAF
    python demo.py --module_name HREM   # a small BERT (bert_demo/) from random weights
"""
import argparse
import logging
import os
import sys
import time

import torch

import evaluation
import matchers
import opts
import synthetic
import train
from checkpoint import save_checkpoint

# Small dims, a smaller batch and a larger learning rate than the paper's, so that it learns in
# minutes; then each matcher's own `demo_flags` (argparse: the last value of a flag wins).
DEMO_FLAGS = ["--embed_size", "256", "--word_dim", "128", "--batch_size", "32",
              "--learning_rate", "0.001", "--log_step", "50", "--val_step", "100000",
              "--workers", "0", "--num_epochs", "2"]


def save_untrained(flags, path):
    """A checkpoint, in the original format, of the model that `train.py flags` starts from."""
    opt = opts.parse_opt(flags)
    train.seed_everything(opt.seed)
    opt.vocab_size = len(matchers.matcher_class(opt.module_name).vocabulary(opt)[0])
    model = matchers.build_model(opt)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint({"epoch": 0, "model": model.state_dict(), "best_rsum": 0, "opt": opt,
                     "Eiters": 0}, False, filename=path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module_name", default="SGR")
    p.add_argument("--data_path", default="data")
    p.add_argument("--vocab_path", default="vocab")
    p.add_argument("--run_dir", default=None, help="default runs/demo_<module_name>")
    p.add_argument("--num_epochs", type=int, default=None,
                   help="default 2, or the matcher's demo_flags'")
    p.add_argument("--lr_update", type=int, default=10)
    p.add_argument("--n_train", type=int, default=1000, help="training images to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args, extra = p.parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    data_name = "synth_precomp"
    synthetic.make_synthetic(args.data_path, data_name, args.vocab_path, n_train=args.n_train)
    img_dim = synthetic.DEFAULTS["img_dim"]
    run_dir = args.run_dir or os.path.join("runs", "demo_%s" % args.module_name)
    model_name = os.path.join(run_dir, "checkpoint")
    flags = (["--data_path", args.data_path, "--data_name", data_name, "--vocab_path",
              args.vocab_path, "--module_name", args.module_name, "--img_dim", str(img_dim),
              "--lr_update", str(args.lr_update),
              "--model_name", model_name, "--logger_name", os.path.join(run_dir, "log"),
              "--seed", str(args.seed), "--overwrite"] +
             DEMO_FLAGS + matchers.matcher_class(args.module_name).demo_flags + extra +
             (["--num_epochs", str(args.num_epochs)] if args.num_epochs else []) +
             (["--device", args.device] if args.device else []))

    # the same model before training, for comparison
    print("== untrained %s on the synthetic test split" % args.module_name)
    untrained = os.path.join(run_dir, "untrained.pth.tar")
    save_untrained(flags, untrained)
    before = evaluation.evalrank(untrained, data_path=args.data_path, split="test",
                                 vocab_path=args.vocab_path, device=args.device)

    print("== training %s" % args.module_name)
    train.main(flags)
    print("== trained %s on the synthetic test split" % args.module_name)
    after = evaluation.evalrank(os.path.join(model_name, "model_best.pth.tar"),
                                data_path=args.data_path, split="test",
                                vocab_path=args.vocab_path, device=args.device)
    print("demo: rsum %.1f after training, %.1f before (%.1fx) in %.0f s"
          % (after["rsum"], before["rsum"], after["rsum"] / max(before["rsum"], 1e-9),
             time.time() - t0))
    return after, before


if __name__ == "__main__":
    main()
    sys.exit(0)
