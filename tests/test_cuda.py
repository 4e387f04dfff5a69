"""The CUDA path, for every matcher of the registry (marked `cuda`; skipped where CUDA is not
available, i.e. on the machines the rest of the suite runs on). `bash gpu_check.sh` runs them
first on a lent GPU (docs/speed.md).

Each test takes a tiny model of each matcher (its demo flags at tiny sizes, the synthetic
dataset) and compares the CUDA run with the CPU run of the same weights, or checks what only
CUDA has:
- the similarity matrix (evaluation's encode + score) within 1e-5, fp32 with TF32 off;
- one training step: the loss and the pre-clip gradients at the train-step tolerances of
  tests/test_train_step.py (loss 1e-5 relative; each gradient 1e-4 relative + 1e-6 of the
  total norm);
- train.py, evaluation.py and `--resume` as commands on CUDA;
- torchrun with one process (nccl, cuda:LOCAL_RANK) for train.py and evaluation.py, or the
  matcher's one-line refusal of torchrun;
- one DistributedDataParallel step with one nccl process (SGRAF's BatchNorm layers become
  SyncBatchNorm) against the plain CUDA step;
- `--precision bf16`: the evaluation within its stated tolerance of fp32 (2e-2, as
  tests/test_fast_sim.py's), and a bf16 training step with a finite fp32 loss;
- retrieve.py (a text query, an image query) against the CPU's hits;
- the scoring shards' memory budget: shrunk so that a shard no longer fits, the matrix is
  scored in smaller shards (not an out-of-memory error) and equals the unsplit one.
The memory budget's test body also runs on the CPU, without the mark (test_budget_split_cpu).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import contract
import data
import errors
import evaluation
import matchers
import matrix
import opts
import retrieve
from checkpoint import load_checkpoint
from helpers import REPO, tiny_dataset, train_args

HAS_CUDA = torch.cuda.is_available()
NAMES = list(matchers.MATCHERS)

SCORE_ATOL = 1e-5               # CUDA vs CPU similarities, fp32, TF32 off
LOSS_RTOL = 1e-5                # the train-step tolerances (tests/test_train_step.py)
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
BF16_EVAL_ATOL = 2e-2           # bf16 scores against fp32's (tests/test_fast_sim.py)
TIMEOUT = 300


@pytest.fixture
def no_tf32():
    """fp32 matmuls and cuDNN (the GRU) in true fp32 on Ampere and later."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(str(tmp_path_factory.mktemp("synth")), n_train=20, n_dev=6, n_test=6)


# at the tiny embed_size 16, GSMN's default 16 blocks would be of one dimension each, whose
# l2-normalisation is the sign: a score then jumps when rounding flips a value near 0
TINY_OWN = {"GSMN": ["--num_block", "4", "--feat_dim", "4", "--hid_dim", "8"]}


def flags(name, *extra):
    """A tiny run of matcher `name`: its demo flags (HREM's small BERT), a batch of 10."""
    return (["--module_name", name] + matchers.MATCHERS[name].demo_flags +
            TINY_OWN.get(name, []) +
            ["--batch_size", "10", "--num_epochs", "1", "--seed", "0", "--val_step", "1000",
             "--workers", "0"] + list(extra))


def run_args(ds, run, name, device, *extra):
    data_path, vocab_path = ds
    args = train_args(data_path, vocab_path, run, *flags(name, *extra))
    args[args.index("--device") + 1] = device
    return args


@pytest.fixture(scope="module")
def checkpoints(dataset, tmp_path_factory):
    """{name: a checkpoint of one CPU epoch}, made on first use."""
    import train
    made, root = {}, tmp_path_factory.mktemp("ckpts")

    def get(name):
        if name not in made:
            run = str(root / name)
            train.main(run_args(dataset, run, name, "cpu"))
            made[name] = os.path.join(run, "checkpoint", "model_best.pth.tar")
        return made[name]
    return get


def scores(ckpt, ds, device, precision=None):
    """The checkpoint's (n_images, n_captions) matrix of the test split, as evaluation.py
    scores it on `device` (in one block: the matcher's `score` shards it by its budget)."""
    data_path, vocab_path = ds
    _, scorers, loader, _ = evaluation._prepare(ckpt, None, data_path, "test", False,
                                                vocab_path, None, device, None, precision,
                                                say=lambda *a: None)
    model, opt, loader = scorers[0]
    enc = evaluation.encode_data(model, loader, img_stride=loader.dataset.im_div,
                                 progress=False)
    model.show_progress = False
    sims, _ = matrix.score_shard([(model, enc)], (0, len(enc[0]), 0, len(enc[1])))
    return sims


def make_model(name, ds, device, *extra):
    """A seeded new model of `name` on `device` (the same weights on every device: the modules
    are built on the CPU, then moved), with dropout off, and its opt."""
    opt = opts.parse_opt(run_args(ds, "unused", name, device, *extra))
    cls = matchers.matcher_class(name)
    opt.vocab_size = len(cls.vocabulary(opt)[0])
    torch.manual_seed(0)
    model = cls(opt)
    model.train_start()
    for m in model.modules():
        for x in m.modules():
            if isinstance(x, torch.nn.Dropout):
                x.eval()
    return model, opt


def first_batch(name, ds, opt):
    """The first training batch of the tiny split, the same on every call."""
    cls = matchers.matcher_class(name)
    vocab = cls.vocabulary(opt)[0]
    loader, _ = data.get_loaders(opt.data_name, vocab, opt.batch_size, 0, opt,
                                 generator=torch.Generator().manual_seed(0), matcher=cls)
    return next(iter(loader))


def step(model, batch):
    """One train_emb on the batch: (loss, [pre-clip gradient of each parameter, or None])."""
    grads = []
    clip = contract.clip_grad_norm_

    def spy(params, max_norm):
        grads.extend(None if p.grad is None else p.grad.detach().double().cpu()
                     for p in params)
        return clip(params, max_norm)
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(contract, "clip_grad_norm_", spy)
        np.random.seed(0)  # a matcher's own augmentations (HREM's) draw from numpy
        loss = model.train_emb(*batch, **batch.extra)
    if not grads:  # --grad_clip 0: the gradients as the step left them
        grads = [None if p.grad is None else p.grad.detach().double().cpu()
                 for p in model.params]
    return float(loss), grads


def assert_same_step(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (loss, ref_loss)
    assert len(grads) == len(ref_grads)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in ref_grads if g is not None))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), i
        if r is not None:
            err = float(torch.linalg.vector_norm(g - r))
            assert err <= GRAD_RTOL * float(torch.linalg.vector_norm(r)) + GRAD_ATOL * total, \
                (i, err)


def command(args, timeout=TIMEOUT):
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def refuses_torchrun(name, ds):
    """The matcher's one-line refusal of torchrun (its check_opt), or None."""
    opt = opts.parse_opt(run_args(ds, "unused", name, "cuda"))
    try:
        matchers.matcher_class(name).check_opt(opt, distributed=True)
    except errors.SGRAFError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_scores_match_cpu(name, dataset, checkpoints):
    ckpt = checkpoints(name)
    cpu, cuda = scores(ckpt, dataset, "cpu"), scores(ckpt, dataset, "cuda")
    assert cuda.shape == cpu.shape and np.isfinite(cuda).all()
    assert np.abs(cuda - cpu).max() <= SCORE_ATOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_train_step_matches_cpu(name, dataset):
    results = []
    for device in ("cpu", "cuda"):
        model, opt = make_model(name, dataset, device)
        results.append(step(model, first_batch(name, dataset, opt)))
        if device == "cuda":
            assert all(p.device.type == "cuda" for p in model.params)
    assert_same_step(results[1], results[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_train_evaluate_resume(name, dataset, tmp_path):
    run = str(tmp_path / "run")
    r = command(["train.py"] + run_args(dataset, run, name, "cuda"))
    assert r.returncode == 0, r.stderr[-3000:]
    ck0 = os.path.join(run, "checkpoint", "checkpoint_0.pth.tar")
    first = load_checkpoint(ck0)
    assert first["opt"].device == "cuda"
    r = command(["train.py"] + run_args(dataset, run, name, "cuda", "--num_epochs", "2",
                                         "--resume", ck0))
    assert r.returncode == 0, r.stderr[-3000:]
    second = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint_1.pth.tar"))
    assert second["epoch"] == 2 and second["Eiters"] == 2 * first["Eiters"]
    data_path, vocab_path = dataset
    r = command(["evaluation.py", "--model_path", os.path.join(run, "checkpoint",
                                                               "checkpoint_1.pth.tar"),
                 "--data_path", data_path, "--vocab_path", vocab_path, "--split", "test",
                 "--device", "cuda"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rsum:" in r.stdout


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_torchrun_one_process_nccl(name, dataset, checkpoints, tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    run = str(tmp_path / "run")
    r = command(torchrun + ["train.py"] + run_args(dataset, run, name, "cuda"))
    refusal = refuses_torchrun(name, dataset)
    if refusal is not None:  # the matcher's one-line refusal, exit code 2
        assert r.returncode != 0 and refusal in r.stderr, r.stderr[-3000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "torchrun: 1 processes (nccl)" in r.stderr
        ck = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint_0.pth.tar"))
        assert ck["opt"].device == "cuda:0"  # cuda:LOCAL_RANK
        assert not any(k.startswith("module.") for sd in ck["model"] for k in sd)
    data_path, vocab_path = dataset
    r = command(torchrun + ["evaluation.py", "--model_path", checkpoints(name), "--data_path",
                            data_path, "--vocab_path", vocab_path, "--split", "test",
                            "--device", "cuda"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rsum:" in r.stdout


def ddp_worker(rank, name, ds, init_file, out):
    """One nccl process: the DDP train step of make_model's model on the first batch."""
    import torch.distributed as dist
    import distributed
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = distributed.local_device("cuda", rank)
    import torch.distributed.nn.functional  # noqa: F401  (distributed.init's reason)
    dist.init_process_group("nccl", init_method="file://" + init_file, rank=rank,
                            world_size=1)
    model, opt = make_model(name, ds, device)
    model.grad_clip = 0  # the gradients as the backward left them (clipping is in place)
    model.ddp([rank])
    batch = first_batch(name, ds, opt)
    np.random.seed(0)
    loss = model.train_emb(*batch, **batch.extra)
    torch.save({"loss": float(loss),
                "grads": [None if p.grad is None else p.grad.detach().double().cpu()
                          for p in model.params],
                "sync": sum(isinstance(x, torch.nn.SyncBatchNorm)
                            for m in model.modules() for x in m.modules())}, out)
    distributed.finish(model)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_ddp_sync_batchnorm_one_process(name, dataset, tmp_path):
    refusal = refuses_torchrun(name, dataset)
    if refusal is not None:
        pytest.skip("the matcher refuses torchrun: " + refusal)
    out = str(tmp_path / "rank0.pt")
    mp.spawn(ddp_worker, args=(name, dataset, str(tmp_path / "init"), out), nprocs=1,
             join=True)
    got = torch.load(out, weights_only=True)
    model, opt = make_model(name, dataset, "cuda")
    has_bn = any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm)
                 for m in model.modules() for x in m.modules())
    model.grad_clip = 0  # as the worker's
    assert_same_step((got["loss"], got["grads"]), step(model, first_batch(name, dataset, opt)))
    if has_bn:  # under torchrun on CUDA the batch statistics are the processes' together
        assert got["sync"] > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_bf16_evaluation_and_training(name, dataset, checkpoints):
    ckpt = checkpoints(name)
    fp32 = scores(ckpt, dataset, "cuda", precision="fp32")
    bf16 = scores(ckpt, dataset, "cuda", precision="bf16")
    assert np.isfinite(bf16).all() and np.abs(bf16 - fp32).max() <= BF16_EVAL_ATOL
    model, opt = make_model(name, dataset, "cuda", "--precision", "bf16")
    loss, grads = step(model, first_batch(name, dataset, opt))
    assert math.isfinite(loss)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    assert all(p.dtype == torch.float32 for p in model.params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_retrieve_matches_cpu(name, dataset, checkpoints):
    data_path, vocab_path = dataset
    kw = dict(data_path=data_path, vocab_path=vocab_path, split="test", cache_dir=None,
              topk=5)
    for query in ({"query": "a dog runs on the grass"}, {"image": 1}):
        hits = [retrieve.retrieve(checkpoints(name), device=device, **query, **kw)
                for device in ("cpu", "cuda")]
        cpu, cuda = ([(r["index"], r["score"]) for r in h["results"]] for h in hits)
        assert [i for i, _ in cuda] == [i for i, _ in cpu]
        assert max(abs(a - b) for (_, a), (_, b) in zip(cuda, cpu)) <= SCORE_ATOL


def shrink_budget(monkeypatch, name):
    """The matcher's scoring budget at its smallest: contract.memory_budget (as its module
    imported it) at 4 KB, and a class's own byte budget (`sim_budget`) at 4 KB. Returns the
    calls of the shrunken memory_budget."""
    cls = matchers.matcher_class(name)
    module, calls = sys.modules[cls.__module__], []
    if hasattr(module, "memory_budget"):
        monkeypatch.setattr(module, "memory_budget", lambda: calls.append(1) or 4096)
    if hasattr(cls, "sim_budget"):
        monkeypatch.setattr(cls, "sim_budget", 4096)
    assert hasattr(module, "memory_budget") or hasattr(cls, "sim_budget"), \
        "%s: no scoring budget to shrink" % name
    return calls


def budget_split(name, dataset, checkpoints, monkeypatch, device):
    ckpt = checkpoints(name)
    whole = scores(ckpt, dataset, device)
    calls = shrink_budget(monkeypatch, name)
    split = scores(ckpt, dataset, device)
    assert calls or hasattr(matchers.matcher_class(name), "sim_budget")
    assert split.shape == whole.shape
    assert np.abs(split - whole).max() <= SCORE_ATOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_budget_split_cuda(name, dataset, checkpoints, monkeypatch):
    budget_split(name, dataset, checkpoints, monkeypatch, "cuda")


@pytest.mark.parametrize("name", NAMES)
def test_budget_split_cpu(name, dataset, checkpoints, monkeypatch):
    """The budget test's body on the CPU (it runs here): a shrunken budget gives the same
    matrix."""
    budget_split(name, dataset, checkpoints, monkeypatch, "cpu")
