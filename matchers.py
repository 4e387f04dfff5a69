"""The registry: every `--module_name` and the class that implements it.

This is the one place that knows which matchers exist. A matcher is one file with a subclass
of `contract.Matcher` (its flags, vocabulary, data, checkpoint layout, train step and scoring)
plus one line in `MATCHERS` below; train.py, evaluation.py, opts.py, data.py, runs.py, errors.py
and checks.py reach it through the functions here and never name it (README, "Adding a matcher").
"""
import checkpoint
import errors
from hrem import HREM
from model import SGRAF
from gsmn import GSMN
from naaf import NAAF

# --module_name -> class. SGR and SAF are the two heads of one class (model.SGRAF).
MATCHERS = {
    "SGR": SGRAF,
    "SAF": SGRAF,
    "NAAF": NAAF,
    "GSMN": GSMN,
    "HREM": HREM,
}


DEFAULT = "SGR"  # --module_name when none is given


def classes():
    """Each class once, in registry order."""
    return list(dict.fromkeys(MATCHERS.values()))


def names_of(cls):
    """The --module_name values a class implements."""
    return [name for name, c in MATCHERS.items() if c is cls]


def matcher_class(name):
    """The class of a --module_name, or a one-line UsageError."""
    if name not in MATCHERS:
        raise errors.error("module_name", "--module_name %s" % name,
                           choices="one of " + ", ".join(MATCHERS))
    return MATCHERS[name]


def add_options(parser):
    """--module_name (its choices from the registry) and every matcher's own flags."""
    parser.add_argument("--module_name", default=DEFAULT, metavar="{%s}" % ",".join(MATCHERS),
                        help="the matcher: " + "; ".join(
                            "%s (%s)" % (", ".join(names_of(c)), c.__module__ + "." +
                                         c.__name__) for c in classes()))
    for cls in classes():
        cls.add_options(parser)


def add_eval_options(parser):
    """The matchers' flags that evaluation.py offers (Matcher.add_eval_options); their dests."""
    dests = []
    for cls in classes():
        dests += [d for d in cls.add_eval_options(parser) if d not in dests]
    return dests


def owners(dest):
    """The --module_name values whose class added the flag `dest` as its own ([] for the flags
    every matcher shares)."""
    return [name for name, cls in MATCHERS.items() if dest in cls.own_options()]


def build_model(opt, device=None):
    """The model of `opt.module_name`, built from the flags."""
    return matcher_class(opt.module_name)(opt, device=device)


def recognise(ckpt, path):
    """The --module_name of a checkpoint (ours or the authors'), read from its contents by
    asking each class; a one-line CheckpointError when none recognises it."""
    for cls in classes():
        name = cls.recognise(ckpt)
        if name is not None:
            return name
    raise errors.error("ckpt_not_model", path,
                       reason="its %d state dicts fit none of %s"
                              % (len(ckpt["model"]), ", ".join(MATCHERS)))


def check_fits(model, ckpt, path, vocab_file="the vocabulary"):
    """The checkpoint fits `model` (built from the flags), or a one-line error that names the
    flags it was trained with, as its own matcher reads them (its --module_name included)."""
    try:
        name = recognise(ckpt, path)
    except errors.CheckpointError:
        name = None
    want = None
    if name is not None:
        want = dict(MATCHERS[name].infer_flags(ckpt["model"], ckpt["opt"]), module_name=name)
    model.check_checkpoint(ckpt, path)
    checkpoint.check_checkpoint_matches(model, ckpt, path, vocab_file, want=want)
