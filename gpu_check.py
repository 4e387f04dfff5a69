"""The one command to run when a GPU is lent (a session gets about 15 minutes of one): every
CUDA check and measurement of the project, in about 8 minutes on one H100.

    python gpu_check.py                          # the cuda tests, then bench.py on CUDA
    python gpu_check.py --skip_tests             # the measurements alone (a rerun)
    python gpu_check.py -- --sgraf_original DIR  # flags after -- go to bench.py (the
                                                 # originals' checkouts it can time)

1. tests/test_cuda.py (`pytest -m cuda`): every matcher of the registry on CUDA against the
   CPU (scores, a train step, train + evaluate + resume, torchrun with nccl, SyncBatchNorm,
   bf16, retrieve.py, the scoring memory budget).
2. bench.py on CUDA for every matcher, fp32 and bf16 (`--precision fp32,bf16`): the evaluation
   of 100 x 500 pairs at full dimensions with its per-caption reference (and the original
   code's, where bench.py is given its checkout), the evaluation of 1000 x 5000 pairs
   (fast paths only: the per-caption reference alone would take minutes), and one train step
   at batch 128 with its reference.
3. One markdown table of all the times, ready for docs/speed.md, with the GPU's name.

Where CUDA is not available it says so in one line and exits 0 (so that a script may run it
anywhere). The exit code is otherwise pytest's (0: every cuda test passed).
"""
import os
import subprocess
import sys
import time

import torch

import bench
import errors

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_TIMEOUT = 300  # seconds for the cuda tests; the rest of the 8 minutes is bench.py's


def run_tests():
    """pytest -m cuda on tests/test_cuda.py; its exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "-rfEs", os.path.join("tests", "test_cuda.py")]
    try:
        return subprocess.run(cmd, cwd=HERE, timeout=TEST_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        print("gpu_check.py: the cuda tests ran past %d s; stopped" % TEST_TIMEOUT)
        return 1


def measure(extra):
    """bench.py's two runs on CUDA: {(matcher, variant): {column: seconds}}."""
    common = ["--device", "cuda", "--precision", "fp32,bf16", "--threads", "4"] + extra
    small = bench.main(common + ["--what", "eval,train"])
    large = bench.main(common + ["--what", "eval", "--n_img", "1000", "--n_cap", "5000",
                                 "--no_ref"])
    rows = {}
    for key, r in small.items():
        rows[key] = {(c.replace("eval", "eval 100x500") if c.startswith("eval") else c): v
                     for c, v in r.items()}
    for key, r in large.items():
        rows.setdefault(key, {}).update({c.replace("eval", "eval 1000x5000"): v
                                         for c, v in r.items()})
    return rows


RATIOS = [("eval 100x500 per-caption", "eval 100x500 fp32"),
          ("eval 100x500 ORIGINAL", "eval 100x500 fp32"),
          ("eval 1000x5000 fp32", "eval 1000x5000 bf16"),
          ("train per-caption", "train fp32"), ("train fp32", "train bf16")]


def build_parser():
    p = errors.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--skip_tests", action="store_true", help="bench.py only")
    p.add_argument("--skip_bench", action="store_true", help="the cuda tests only")
    p.add_argument("bench_args", nargs="*", metavar="-- BENCH_FLAG",
                   help="after --: flags for bench.py (e.g. --sgraf_original DIR)")
    return p


@errors.exit_on_error
def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    extra = args.bench_args
    if not torch.cuda.is_available():
        print("gpu_check.py: CUDA is not available here (torch %s); nothing to check"
              % torch.__version__)
        return 0
    start = time.time()
    name = torch.cuda.get_device_name(0)
    print("gpu_check.py on %s, torch %s, CUDA %s" % (name, torch.__version__,
                                                      torch.version.cuda), flush=True)
    code = 0 if args.skip_tests else run_tests()
    print("gpu_check.py: cuda tests %s, %.0f s" % ("skipped" if args.skip_tests else
                                                   "exit code %d" % code, time.time() - start),
          flush=True)
    if not args.skip_bench:
        rows = measure(extra)
        print("\n%s, torch %s: times in seconds (bench.py, full dimensions; eval fast paths "
              "fp32/bf16 against the fp32 per-caption reference; train batch 128, or a "
              "matcher's own bench_train_batch)\n" % (name, torch.__version__))
        print(bench.markdown_table(rows, RATIOS))
    print("\ngpu_check.py: done in %.0f s" % (time.time() - start))
    return code


if __name__ == "__main__":
    sys.exit(main())
