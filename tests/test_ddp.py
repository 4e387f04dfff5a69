"""Multi-process training (torchrun, DistributedDataParallel) on CPU with gloo.

- `torchrun --standalone --nproc_per_node=2` runs train.py on the synthetic dataset: exit 0, the
  checkpoints come from rank 0 alone, without DDP's `module.` prefix, load in evaluation.py,
  and the parameters are the same on both ranks after the last step; `--resume` under torchrun
  continues the run exactly.
- One DDP step of 2 processes gives the gradients of the single-process computation: each
  process's loss on its own half of the batch (its own BatchNorm statistics), the gradients
  averaged over the processes as DDP does, i.e. the gradient of (loss_0 + loss_1) / 2.
- `--world_size` that disagrees with the launcher is a usage error (exit code 2).
No GPU here: nccl, SyncBatchNorm and multi-node launches are not exercised by these tests.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import opts
import outputs
from checkpoint import load_checkpoint
from helpers import tiny_dataset, tiny_dims, train_args
from model import SGRAF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py run as __main__ under torchrun, with a spy on the train step that writes this rank's
# parameters after the last step (train.py itself saves on rank 0 only), and the names of the
# process's threads once train.py has returned (Linux: /proc)
PROBE = """
import os, runpy, sys
import torch
repo, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
import model
step, last = model.SGRAF.train_emb, {}

def train_emb(self, *args, **kwargs):
    loss = step(self, *args, **kwargs)
    last["params"] = [p.detach().clone() for p in self.params]
    return loss

model.SGRAF.train_emb = train_emb
sys.argv = [os.path.join(repo, "train.py")] + sys.argv[3:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    torch.save(last.get("params"), os.path.join(out, "params_rank%s.pt" % os.environ["RANK"]))
    if os.path.isdir("/proc/self/task"):
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                names.append(open("/proc/self/task/%s/comm" % t).read().strip())
            except OSError:  # a thread that just ended
                pass
        with open(os.path.join(out, "threads_rank%s.txt" % os.environ["RANK"]), "w") as f:
            f.write("\\n".join(sorted(names)))
"""


def torchrun(args, cwd, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=%d" % nproc] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 10 images, 50 captions: 25 per rank, batches of 10, 10, 5
    return tiny_dataset(str(tmp_path_factory.mktemp("synth")), n_train=10, n_dev=4, n_test=4)


def test_torchrun_trains_saves_on_rank0_and_resumes(dataset, tmp_path, capsys):
    data_path, vocab_path = dataset
    common = ["--num_epochs", "2", "--seed", "3", "--world_size", "2"]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run = str(tmp_path / "run")
    r = torchrun([str(probe), REPO, str(tmp_path)] +
                 train_args(data_path, vocab_path, run, *common), cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt_dir = os.path.join(run, "checkpoint")
    assert sorted(os.listdir(ckpt_dir)) == [outputs.MARKER, "checkpoint_0.pth.tar",
                                            "checkpoint_1.pth.tar", "model_best.pth.tar"]
    ck = load_checkpoint(os.path.join(ckpt_dir, "checkpoint_1.pth.tar"))
    assert ck["epoch"] == 2 and ck["Eiters"] == 6 and len(ck["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for sd in ck["model"] for k in sd)
    # the same parameters on both ranks after the last step, and in rank 0's checkpoint
    p0, p1 = (torch.load(str(tmp_path / ("params_rank%d.pt" % r)), weights_only=True)
              for r in (0, 1))
    assert len(p0) == len(p1) > 0 and all(torch.equal(a, b) for a, b in zip(p0, p1))
    opt = ck["opt"]
    opt.device = "cpu"
    saved = SGRAF(opt)
    saved.load_state_dict(ck["model"])
    assert all(torch.equal(a, b) for a, b in zip(p0, saved.params))
    assert opt.lr_scale == 2 and ck["optimizer"]["param_groups"][0]["lr"] == 2 * 0.0002
    # the process group is really gone when train.py returns: no gloo thread is left for the
    # interpreter's shutdown to destroy (the cause of a rare "terminate called without an
    # active exception" abort at exit; see distributed.init)
    for r in (0, 1):
        path = tmp_path / ("threads_rank%d.txt" % r)
        if path.exists():
            threads = path.read_text().split()
            assert not [t for t in threads if "gloo" in t], (r, threads)

    # single-process evaluation of the rank-0 checkpoint
    import evaluation
    capsys.readouterr()
    evaluation.main(["--model_path", os.path.join(ckpt_dir, "checkpoint_1.pth.tar"),
                     "--data_path", data_path, "--vocab_path", vocab_path, "--split", "test",
                     "--device", "cpu"])
    assert "rsum:" in capsys.readouterr().out

    # --resume under torchrun (plain train.py) from epoch 0 replays epoch 1 exactly
    resumed = str(tmp_path / "resumed")
    r = torchrun([os.path.join(REPO, "train.py")] +
                 train_args(data_path, vocab_path, resumed, *common, "--resume",
                            os.path.join(ckpt_dir, "checkpoint_0.pth.tar")),
                 cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = load_checkpoint(os.path.join(resumed, "checkpoint", "checkpoint_1.pth.tar"))
    assert again["Eiters"] == 6
    for sa, sb in zip(ck["model"], again["model"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- one DDP step

CONFIGS = {"SGR": ["--module_name", "SGR"],
           "SGR_DAA": ["--module_name", "SGR", "--daa_weight", "1.0"],
           "SAF": ["--module_name", "SAF"]}
B, V = 6, 30  # pairs per process, vocabulary size


def make_opt(name):
    opt = opts.parse_opt(tiny_dims() + ["--device", "cpu", "--grad_clip", "0"] + CONFIGS[name])
    opt.vocab_size = V
    return opt


def make_model(name, captions):
    torch.manual_seed(0)
    model = SGRAF(make_opt(name))
    model.set_semantics(captions)
    model.train_start()
    for m in model.modules():  # dropout off: the same function on every process
        for x in m.modules():
            if isinstance(x, torch.nn.Dropout):
                x.eval()
    return model


def make_batch():
    """A global batch of 2B pairs: (images, captions, lengths, ids) per rank, and the captions
    of the split (DAA's semantics)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2 * B, 36, 32, generator=g)
    lens = torch.randint(3, 9, (2 * B,), generator=g)
    words = torch.randint(4, V, (2 * B, 8), generator=g)
    # the split: 5 captions per image (DAA's semantics), pair k is (image k, caption 5k)
    split_words = torch.randint(0, 7, (5 * 2 * B, 6), generator=g)
    captions = [" ".join("w%d" % w for w in row.tolist()) for row in split_words]
    halves = []
    for r in range(2):
        idx = list(range(r * B, (r + 1) * B))
        L = int(lens[idx].max())
        caps = torch.zeros(B, L, dtype=torch.int64)
        for k, i in enumerate(idx):
            caps[k, :lens[i]] = words[i, :lens[i]]
        halves.append((images[idx], caps, lens[idx].tolist(), [5 * i for i in idx]))
    return halves, captions


def grads_of(model):
    return [p.grad.detach().clone() for p in model.params]


def ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=2)
    halves, captions = make_batch()
    result = {}
    for name in CONFIGS:
        model = make_model(name, captions).ddp()
        model.train_emb(*halves[rank])
        result[name] = {"grads": grads_of(model),
                        "params": [p.detach().clone() for p in model.params]}
    torch.save(result, os.path.join(out_dir, "rank%d.pt" % rank))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_step")
    mp.spawn(ddp_worker, args=(str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(str(out / ("rank%d.pt" % r)), weights_only=True) for r in (0, 1)]


@pytest.fixture
def one_thread():
    # as the workers: float32 GEMMs on another number of threads round differently (~1e-5 on
    # the GRU's gradients), which is not what this test is about
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_step_gradients(ddp_step, name, one_thread):
    halves, captions = make_batch()
    per_rank = []
    for r in range(2):  # each process's loss on its own half, from the same initial weights
        model = make_model(name, captions)
        model.train_emb(*halves[r])
        per_rank.append(grads_of(model))
    # DDP averages the gradients over the processes
    reference = [(g0 + g1) / 2 for g0, g1 in zip(*per_rank)]
    for r in range(2):
        got = ddp_step[r][name]["grads"]
        assert len(got) == len(reference)
        for i, (a, b) in enumerate(zip(got, reference)):
            assert torch.allclose(a, b, rtol=0, atol=1e-5), (name, r, i, (a - b).abs().max())
    # identical on both ranks: the same gradients, then the same Adam step
    for key in ("grads", "params"):
        assert all(torch.equal(a, b) for a, b in zip(ddp_step[0][name][key],
                                                     ddp_step[1][name][key])), key


# ----------------------------------------------------------------------------- --world_size

def test_world_size_must_match_the_launcher(dataset, tmp_path, monkeypatch, capsys):
    import train
    data_path, vocab_path = dataset
    args = train_args(data_path, vocab_path, str(tmp_path / "run"), "--world_size", "4")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --world_size 4: train.py is a single process") and \
        "torchrun --standalone --nproc_per_node=4 train.py" in err

    # under torchrun (the check comes before the process group is initialised)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: --world_size 4: torchrun started 2 processes (WORLD_SIZE=2); pass "
        "--world_size 2")
    assert not os.path.exists(str(tmp_path / "run"))
