"""Every command-line option, with the defaults of the original SGRAF `opts.py`.

Differences from the original (see README, "Differences from the original"):
- paths default to `data/`, `vocab/` and `runs/<data_name>_<module_name>/{checkpoint,log}`
  instead of the authors' absolute paths;
- `--max_violation` and `--bi_gru` are on by default as in the original, but the original's
  `store_false` meant that passing the flag turned the feature OFF. Here they are
  `--max_violation/--no-max_violation` and `--bi_gru/--no-bi_gru`;
- `parse_opt(argv=None)` takes an argument list (tests) and does not print the options;
- `--num_epoches` (a misspelling in some originals' README commands) is accepted for
  `--num_epochs`.

The flags every matcher shares are here; `--module_name` and each matcher's own flags come from
the registry (matchers.py), with the originals' names and defaults. Where a matcher's original
has another default for a shared flag (a learning rate, say), its class's `defaults` apply to
every flag not given on the command line; a flag that belongs to other matchers only is refused
with a one-line error rather than ignored. `check_train_opt` checks, before any compute, the
flags that cannot work together, the device and the paths.
"""
import argparse
import os

import distributed
import errors
import matchers


def _device_default():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser(prog="train.py"):
    p = errors.ArgumentParser(prog=prog, description="SGRAF / DAA image-text matching")
    # --------------------------- data path -------------------------#
    p.add_argument("--data_path", default="data", help="path to datasets (holds <data_name>/)")
    p.add_argument("--data_name", default="f30k_precomp", help="{coco,f30k}_precomp")
    p.add_argument("--vocab_path", default="vocab", help="path to saved vocabulary json files")
    p.add_argument("--model_name", default=None,
                   help="where checkpoints go (default runs/<data_name>_<module_name>/checkpoint)")
    p.add_argument("--logger_name", default=None,
                   help="TensorBoard log dir (default runs/<data_name>_<module_name>/log)")
    p.add_argument("--feat_format", default="auto", choices=["auto", "npy", "h5"],
                   help="image features: {split}_ims.npy (memory-mapped) or {split}.h5; "
                        "auto prefers .npy when both exist")

    # ----------------------- training setting ----------------------#
    p.add_argument("--batch_size", default=128, type=int, help="size of a training mini-batch")
    # --num_epoches: a misspelling in an original's README commands (its argparse rejected it)
    p.add_argument("--num_epochs", "--num_epoches", dest="num_epochs", default=40, type=int,
                   help="number of training epochs")
    p.add_argument("--lr_update", default=30, type=int,
                   help="number of epochs after which the learning rate is divided by 10")
    p.add_argument("--learning_rate", default=0.0002, type=float, help="initial learning rate")
    p.add_argument("--workers", default=10, type=int, help="number of data loader workers")
    p.add_argument("--log_step", default=10, type=int, help="iterations between log lines")
    p.add_argument("--val_step", default=1000, type=int, help="iterations between validations")
    p.add_argument("--grad_clip", default=2.0, type=float, help="gradient clipping threshold")
    p.add_argument("--margin", default=0.2, type=float, help="rank loss margin")
    p.add_argument("--max_violation", default=True, action=argparse.BooleanOptionalAction,
                   help="hardest negative instead of the sum of violations in the rank loss")

    # ------------------------- model setting -----------------------#
    p.add_argument("--img_dim", default=2048, type=int, help="dimension of the image features")
    p.add_argument("--word_dim", default=300, type=int, help="dimension of the word embedding")
    p.add_argument("--embed_size", default=1024, type=int, help="dimension of the joint embedding")
    p.add_argument("--num_layers", default=1, type=int, help="number of GRU layers")
    p.add_argument("--bi_gru", default=True, action=argparse.BooleanOptionalAction,
                   help="bidirectional GRU (halves averaged)")
    p.add_argument("--no_imgnorm", action="store_true", help="do not l2-normalise image embeddings")
    p.add_argument("--no_txtnorm", action="store_true", help="do not l2-normalise text embeddings")

    # ------------------------- running -----------------------------#
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", default=None, type=int, help="random seed (reproducible on CPU)")
    p.add_argument("--resume", default="", type=str, help="checkpoint to resume training from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run: its checkpoints in --model_name and its "
                        "TensorBoard logs in --logger_name (removed at the new run's first "
                        "checkpoint)")
    p.add_argument("--world_size", default=None, type=int,
                   help="accepted for the DAA commands; must equal the torchrun world size")
    p.add_argument("--scale_lr", default=True, action=argparse.BooleanOptionalAction,
                   help="under torchrun, multiply the learning rate by the world size (DAA)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="training precision, also of the validation scores: fp32 (default; "
                        "with --resume, the checkpoint's) or bf16 autocast (docs/training.md)")

    # ------------------------- the matchers (matchers.py) ----------#
    matchers.add_options(p)
    return p


def given_flags(parser, argv):
    """The dests of the flags given on the command line `argv` (not left at their default)."""
    for action in parser._actions:  # noqa: SLF001 (argparse has no public way to say this)
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def apply_matcher(opt, given):
    """The chosen matcher's defaults for the flags not given; a flag of other matchers only is
    refused."""
    cls = matchers.matcher_class(opt.module_name)
    for dest, value in cls.defaults.items():
        if dest not in given:
            setattr(opt, dest, value)
    for dest in sorted(given):
        owners = matchers.owners(dest)
        if owners and opt.module_name not in owners:
            raise errors.error("flag_unsupported", errors.flag_text(dest, getattr(opt, dest)),
                               model=opt.module_name,
                               why="it is an option of %s" % ", ".join(owners))
    return opt


def finalize(opt):
    """Fill the defaults that depend on other options."""
    run_dir = os.path.join("runs", "%s_%s" % (opt.data_name, opt.module_name))
    if opt.model_name is None:
        opt.model_name = os.path.join(run_dir, "checkpoint")
    if opt.logger_name is None:
        opt.logger_name = os.path.join(run_dir, "log")
    if opt.device is None:
        opt.device = _device_default()
    if opt.precision is None and not opt.resume:  # a resumed run keeps its checkpoint's
        opt.precision = "fp32"
    return opt


def parse_opt(argv=None, prog="train.py"):
    """train.py's options from `argv`; `prog` is the command whose line they were given on
    (demo.py passes train.py the flags it does not know), named by an argument error."""
    parser = build_parser(prog)
    opt = parser.parse_args(argv)
    return finalize(apply_matcher(opt, given_flags(parser, argv)))


_POSITIVE = ("num_epochs", "batch_size", "log_step", "val_step", "img_dim", "word_dim",
             "embed_size", "num_layers")
_NONNEGATIVE = ("workers", "grad_clip", "seed")


def check_train_opt(opt):
    """Flags of train.py that cannot work together, its device and its paths. (The matcher's
    own flags are checked by its class's `check_opt`; where the run writes, by `runs.check_run`.)"""
    errors.check_positive(opt, _POSITIVE)
    errors.check_nonnegative(opt, _NONNEGATIVE)
    if opt.lr_update < 1:
        raise errors.error("lr_update", errors.opt_where(opt, "lr_update"))
    if not opt.learning_rate > 0:
        raise errors.error("learning_rate", errors.opt_where(opt, "learning_rate"))
    if opt.margin < 0:
        raise errors.error("margin", errors.opt_where(opt, "margin"))
    if opt.batch_size == 1:
        raise errors.error("batch_one", errors.opt_where(opt, "batch_size"))
    distributed.check_device(opt.device)
    errors.check_data_name(opt.data_name, opt.data_path)
    errors.check_dir(opt.data_path, "--data_path %s" % opt.data_path, exists=False,
                     expected="the directory that holds <data_name>/")
    errors.check_dir(opt.vocab_path, "--vocab_path %s" % opt.vocab_path, exists=False,
                     expected="the directory that holds <data_name>_vocab.json")
    errors.check_dir(opt.model_name, "--model_name %s" % opt.model_name, exists=False,
                     expected="a directory for the checkpoints (created if missing)")
    errors.check_dir(opt.logger_name, "--logger_name %s" % opt.logger_name, exists=False,
                     expected="a directory for the TensorBoard logs (created if missing)")
