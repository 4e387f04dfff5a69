"""The whole job in a few minutes on a laptop CPU, with no dataset to download.

Generates the synthetic SCAN-format dataset (synthetic.py) if it is missing, trains a small
model of any matcher of the registry (SGR by default, `--module_name` for the others) with
train.py, and evaluates the best checkpoint on the test split with evaluation.py, printing the
original result lines next to those of the same model before training. Then the pictures
(README, "Search and pictures"): `evaluation.py --plots` into <run_dir>/plots/, and
`retrieve.py --query DEMO_QUERY --explain <run_dir>/explain.png` (its top 3 test images and the
attention behind them). It ends with the command that serves the model's search page
(serve.py).

    python demo.py                      # SGR
    python demo.py --module_name SAF
    python demo.py --module_name NAAF
    python demo.py --module_name HREM   # a small BERT (bert_demo/) from random weights

The run goes to runs/demo_<module_name>/ (marked as the demo's: a later demo replaces it), or
to --run_dir: a directory that holds another run is refused, never replaced, unless
--overwrite (flags it does not know go to train.py).
"""
import argparse
import logging
import os
import shlex
import sys
import time

import torch

import distributed
import errors
import evaluation
import matchers
import opts
import outputs
import plots
import retrieve
import runs
import synthetic
import train
import twostage
from checkpoint import save_checkpoint

# Small dims, a smaller batch and a larger learning rate than the paper's, so that it learns in
# minutes; then each matcher's own `demo_flags` (argparse: the last value of a flag wins).
DEMO_FLAGS = ["--embed_size", "256", "--word_dim", "128", "--batch_size", "32",
              "--learning_rate", "0.001", "--log_step", "50", "--val_step", "100000",
              "--workers", "0", "--num_epochs", "2"]


DEMO_QUERY = "a dog kicks an orange ball on the grass"


def save_untrained(flags, path):
    """A checkpoint, in the original format, of the model that `train.py flags` starts from."""
    opt = opts.parse_opt(flags)
    train.seed_everything(opt.seed)
    opt.vocab_size = len(matchers.matcher_class(opt.module_name).vocabulary(opt)[0])
    model = matchers.build_model(opt)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint({"epoch": 0, "model": model.state_dict(), "best_rsum": 0, "opt": opt,
                     "Eiters": 0}, False, filename=path, made_by="demo.py")


def _inside(path, directory):
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return os.path.commonpath([path, directory]) == directory


def run_files(opt, untrained):
    """What a run left where `train.py` with these options would write: its checkpoints, its
    TensorBoard logs, and the demo's untrained checkpoint."""
    found = [p for _, p in runs.run_checkpoints(opt.model_name)]
    found += [p for p in (os.path.join(opt.model_name, runs.BEST), untrained)
              if os.path.isfile(p)]
    if os.path.isdir(opt.logger_name):
        found += [os.path.join(opt.logger_name, n) for n in sorted(os.listdir(opt.logger_name))
                  if n.startswith(runs.TB_EVENTS)]
    return found


def build_parser():
    """demo.py's own flags (the others are train.py's, passed on)."""
    p = errors.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0],
                              epilog="Other flags are passed on to train.py.")
    p.add_argument("--module_name", default="SGR")
    p.add_argument("--data_path", default="data")
    p.add_argument("--vocab_path", default="vocab")
    p.add_argument("--run_dir", default=None,
                   help="default runs/demo_<module_name>, which a later demo replaces; a "
                        "directory that holds another run is refused (--overwrite replaces it)")
    p.add_argument("--num_epochs", type=int, default=None,
                   help="default 2, or the matcher's demo_flags'")
    p.add_argument("--lr_update", type=int, default=10)
    p.add_argument("--n_train", type=int, default=1000, help="training images to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--two_stage", action="store_true",
                   help="also train the registry's dual encoder on the same split, and "
                        "evaluate it shortlisting for --module_name (which re-ranks), for each "
                        "--rerank_k, beside both models alone (docs/two_stage.md)")
    p.add_argument("--rerank_k", default=[8, 16, 32, 64], type=twostage.parse_ks,
                   metavar="K[,K...]", help="with --two_stage: the K to evaluate")
    return p


@errors.exit_on_error
def main(argv=None):
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    if args.two_stage:
        return two_stage(args, [a for a in (sys.argv[1:] if argv is None else argv)
                                if a != "--two_stage"])
    return run(prepare(args, extra))


def prepare(args, extra):
    """Every check before any compute: the demo's flags, train.py's (the extra ones
    included), the synthetic data, and where the run writes. Returns what `run` needs."""
    errors.check_positive(args, ["num_epochs", "lr_update", "n_train", "threads"])
    errors.check_nonnegative(args, ["seed"])
    distributed.check_device(args.device)
    matcher = matchers.matcher_class(args.module_name)
    data_name = "synth_precomp"
    img_dim = synthetic.DEFAULTS["img_dim"]
    run_dir = args.run_dir or os.path.join("runs", "demo_%s" % args.module_name)
    where = "--run_dir %s" % run_dir
    errors.check_dir(run_dir, where, exists=False,
                     expected="a directory for the demo's run (created if missing)")
    plots_dir, explain = os.path.join(run_dir, "plots"), os.path.join(run_dir, "explain.png")
    # before training: the pictures will not be written over files these commands did not make
    outputs.check_outputs(plots.eval_paths(plots_dir), "evaluation.py --plots", "--plots")
    outputs.check_outputs([explain], "retrieve.py --explain", "--explain")
    flags = (["--data_path", args.data_path, "--data_name", data_name, "--vocab_path",
              args.vocab_path, "--module_name", args.module_name, "--img_dim", str(img_dim),
              "--lr_update", str(args.lr_update),
              "--model_name", os.path.join(run_dir, "checkpoint"),
              "--logger_name", os.path.join(run_dir, "log"), "--seed", str(args.seed)] +
             DEMO_FLAGS + matcher.demo_flags + extra +
             (["--num_epochs", str(args.num_epochs)] if args.num_epochs else []) +
             (["--device", args.device] if args.device else []))
    opt = opts.parse_opt(flags, prog="demo.py")
    matcher.check_opt(opt)
    opts.check_train_opt(opt)
    synthetic.check_synthetic(args.data_path, data_name, args.vocab_path, n_train=args.n_train,
                              overwrite=opt.overwrite)
    # a directory the user named (--run_dir, or --model_name/--logger_name among the extra
    # flags) is never replaced unless --overwrite; the default one only when it holds a run of
    # an earlier demo
    untrained = os.path.join(run_dir, "untrained.pth.tar")
    ours = (args.run_dir is None and _inside(opt.model_name, run_dir) and
            _inside(opt.logger_name, run_dir) and
            outputs.made_by(run_dir) == "demo.py")
    replace = opt.overwrite or ours
    if not replace:
        found = [os.path.relpath(f, run_dir) for f in run_files(opt, untrained)
                 if _inside(f, run_dir)]
        if found:
            raise errors.error("run_dir", where, found=" and ".join(found[:2]) + (
                " and %d more file(s)" % (len(found) - 2) if len(found) > 2 else ""),
                whose="another run" if args.run_dir else "a run that demo.py did not make")
    runs.check_run(argparse.Namespace(**dict(vars(opt), overwrite=replace)))
    outputs.check_output_file(untrained, made_by="demo.py", overwrite=replace,
                              alternative="another --run_dir")
    if replace and not opt.overwrite:
        flags.append("--overwrite")  # the demo's own earlier run, in its own directory

    return argparse.Namespace(args=args, flags=flags, opt=opt, run_dir=run_dir,
                              data_name=data_name, untrained=untrained,
                              plots_dir=plots_dir, explain=explain)


def run(p):
    """The demo `prepare` checked: train, evaluate before and after, draw."""
    args, flags, opt, run_dir = p.args, p.flags, p.opt, p.run_dir
    data_name, untrained, plots_dir, explain = p.data_name, p.untrained, p.plots_dir, p.explain
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    os.makedirs(run_dir, exist_ok=True)
    if args.run_dir is None:
        outputs.mark_made(run_dir, "demo.py")
    errors.on_interrupt("the demo's run in %s is incomplete" % run_dir,
                        "run the same command again%s" % (" with --overwrite" if args.run_dir
                                                          and not opt.overwrite else ""))
    synthetic.make_synthetic(args.data_path, data_name, args.vocab_path, n_train=args.n_train,
                             overwrite=opt.overwrite)

    # the same model before training, for comparison
    print("== untrained %s on the synthetic test split" % args.module_name)
    save_untrained(flags, untrained)
    before = evaluation.evalrank(untrained, data_path=args.data_path, split="test",
                                 vocab_path=args.vocab_path, device=args.device)

    print("== training %s" % args.module_name)
    train.main(flags)
    print("== trained %s on the synthetic test split" % args.module_name)
    best = os.path.join(opt.model_name, runs.BEST)
    after = evaluation.evalrank(best, data_path=args.data_path, split="test",
                                vocab_path=args.vocab_path, device=args.device, plots=plots_dir)
    print("== the trained %s's top test images for \"%s\"" % (args.module_name, DEMO_QUERY))
    explained = matchers.matcher_class(args.module_name).attention_info is not None
    hits = retrieve.retrieve(best, query=DEMO_QUERY, topk=3, data_path=args.data_path,
                             vocab_path=args.vocab_path, split="test", device=args.device,
                             cache_dir=None, explain=explain if explained else None)
    print(retrieve.format_table(hits))
    print("demo: rsum %.1f after training, %.1f before (%.1fx) in %.0f s; pictures: %s%s"
          % (after["rsum"], before["rsum"], after["rsum"] / max(before["rsum"], 1e-9),
             time.time() - t0, plots_dir, (", " + explain) if explained else ""))
    print("demo: browse its results and mistakes: python serve.py --model_path %s --data_path "
          "%s --vocab_path %s --split test  (then open http://127.0.0.1:8000/)"
          % tuple(shlex.quote(p) for p in (best, args.data_path, args.vocab_path)))
    return after, before


def _without(argv, flag):
    """argv without `flag` and its value (`--flag X` or `--flag=X`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def two_stage(args, argv):
    """demo.py --two_stage: the demo of --module_name (the re-ranker) and of the registry's
    dual encoder (the shortlist) on the same synthetic split, each as `demo.py` trains and
    evaluates it, then the two-stage evaluation of the pair for each --rerank_k, and a table:
    K, pairs scored, rsum (two-stage, the re-ranker alone, the shortlist alone) and time."""
    reranker = matchers.matcher_class(args.module_name)
    if reranker.embeds_alone:
        raise errors.error("flag_unsupported", "--two_stage", model=args.module_name,
                           why="it embeds alone: pass a --module_name that re-ranks by "
                               "cross-attention")
    short_name = next(n for n in matchers.MATCHERS if matchers.matcher_class(n).embeds_alone)
    argv = _without(_without(_without(argv, "--module_name"), "--run_dir"), "--rerank_k")
    plans, best = [], {}
    for name in (args.module_name, short_name):  # both checked before either trains
        sub, extra = build_parser().parse_known_args(
            argv + ["--module_name", name] +
            (["--run_dir", os.path.join(args.run_dir, name)] if args.run_dir else []))
        plans.append(prepare(sub, extra))
        best[name] = os.path.join(plans[-1].opt.model_name, runs.BEST)
    for plan in plans:
        run(plan)
    return two_stage_table(args, best, args.module_name, short_name)


def two_stage_table(args, best, name, short_name):
    """The end of demo.py --two_stage, on the trained checkpoints `best` ({matcher: path}):
    each model alone, then the two-stage evaluation for each --rerank_k, and the table."""
    common = dict(data_path=args.data_path, split="test", vocab_path=args.vocab_path,
                  device=args.device)
    alone = {}
    rows = []
    for who in (name, short_name):
        print("== %s alone (exhaustive) on the synthetic test split" % who)
        t0 = time.time()
        alone[who] = evaluation.evalrank(best[who], **common)
        rows.append(("%s alone" % who, alone[who]["sims"].size, alone[who]["sims"].size,
                     alone[who]["rsum"], time.time() - t0, None))
    for k in args.rerank_k:
        print("== two-stage, K = %d" % k)
        t0 = time.time()
        out = evaluation.evalrank(best[name], shortlist=best[short_name],
                                  rerank_k=[k], **common)
        rows.append(("K = %d" % k, out["pairs"], out["all_pairs"], out["rsum"],
                     time.time() - t0, out["rerank_time"]))
    print("demo --two_stage: %s shortlists, %s re-ranks, on the synthetic test split"
          % (short_name, name))
    print("%-12s  %16s  %6s  %7s  %s" % ("", "pairs scored", "rsum", "time",
                                          "(re-ranking)"))
    for label, pairs, n_all, rsum, seconds, rerank in rows:
        scored = "%d (%.1f%%)" % (pairs, 100.0 * pairs / n_all) if label.startswith("K") else \
            ("%d (all)" % n_all if label.startswith(name) else "none")
        print("%-12s  %16s  %6.1f  %6.1fs  %s" % (label, scored, rsum, seconds,
                                                "" if rerank is None else "%.1fs" % rerank))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
