"""GSMN through the matcher contract: evaluation.py on the original code's checkpoints with no
GSMN flag (the fixture's split written as a dataset, with and without the optional box, size and
dependency files), the dataset's box modes against the original loader's mechanics, training and
resuming with train.py, ensembles, and the one-line errors for bad input files and flags."""
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import evaluation
import gsmn
import matchers
import opts
import train
from checkpoint import load_checkpoint
from helpers import eval_main, result_lines, run_eval, tiny_dataset, train_args
from test_gsmn import OriginalBoxLoader
from vocab import Vocabulary, deserialize_vocab, serialize_vocab

FIXTURES = ["gsmn_dense_small_seed1", "gsmn_sparse_small_seed1"]


def sizes_file(path, w, h, protocol=None):
    """{split}_ims_size.npy as the authors wrote it: an object array of dicts."""
    arr = np.empty(len(w), dtype=object)
    for i in range(len(w)):
        arr[i] = {"image_w": int(w[i]), "image_h": float(h[i])}
    if protocol is None:
        np.save(path, arr, allow_pickle=True)
        return
    # a Python 2 era file: numpy.core module names, pickle protocol 2
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False,
                                                 "shape": arr.shape})
        f.write(pickle.dumps(arr, protocol=protocol).replace(b"numpy._core", b"numpy.core"))


def fixture_dataset(root, fixtures, name, boxes=True, arcs=True):
    """The fixture's test split as the original reads it: f30k_precomp/test_ims.npy (each
    image once, 5 captions each), test_precaps_stan.txt (the ids), a caps.txt of placeholder
    words, the 50-word vocabulary, and optionally the boxes, sizes and arcs."""
    d = fixtures / "gsmn_ref" / name
    inp = np.load(d / "inputs.npz")
    data_path, vocab_path = os.path.join(root, "data"), os.path.join(root, "vocab")
    loc = os.path.join(data_path, "f30k_precomp")
    os.makedirs(loc, exist_ok=True)
    os.makedirs(vocab_path, exist_ok=True)
    np.save(os.path.join(loc, "test_ims.npy"), inp["images"])
    lens = inp["lengths"]
    with open(os.path.join(loc, "test_precaps_stan.txt"), "w") as f:
        for cap, L in zip(inp["captions"], lens):
            f.write(",".join(str(int(t)) for t in cap[:L]) + "\n")
    vocab = Vocabulary()
    for w in ["<pad>", "<start>", "<end>", "<unk>"] + ["w%d" % i for i in range(46)]:
        vocab.add_word(w)
    serialize_vocab(vocab, os.path.join(vocab_path, "f30k_precomp_vocab.json"))
    with open(os.path.join(loc, "test_caps.txt"), "w") as f:
        for cap, L in zip(inp["captions"], lens):
            f.write(" ".join("w%d" % (int(t) % 46) for t in cap[1:L - 1]) + "\n")
    if boxes:
        np.save(os.path.join(loc, "test_ims_bbx.npy"), inp["bboxes"])
        sizes_file(os.path.join(loc, "test_ims_size.npy"), inp["image_w"], inp["image_h"])
    if arcs:
        shutil.copy(d / "depends.json", os.path.join(loc, "test_caps.json"))
    ckpt = os.path.join(root, "model_best.pth.tar")
    shutil.copy(d / "model_best.pth.tar", ckpt)
    return data_path, vocab_path, ckpt, loc


RESULTS = ("rsum:", "Image to text:", "Text to image:")  # the lines of the original's evalrank


# ----------------------------------------------------------------------------- evaluation.py

@pytest.mark.parametrize("name", FIXTURES)
def test_cli_original_checkpoint(fixtures, tmp_path, name):
    """No GSMN flag: the checkpoint is recognised (its own lambda_softmax 20 and is_sparse),
    and with the box and size files the printed lines are the original evalrank's."""
    exp = np.load(fixtures / "gsmn_ref" / name / "expected.npz")
    data_path, vocab_path, ckpt, loc = fixture_dataset(str(tmp_path), fixtures, name)
    sims = str(tmp_path / "sims.npy")
    out = run_eval("--model_path", ckpt, "--data_path", data_path, "--vocab_path", vocab_path,
                   "--split", "test", "--save_sims", sims).stdout
    np.testing.assert_allclose(np.load(sims), exp["sims"], rtol=0, atol=1e-5)
    i2t, t2i = exp["i2t"], exp["t2i"]
    assert result_lines(out, RESULTS) == [
        "rsum: %.1f" % float(exp["rsum"]),
        "Image to text: %.1f %.1f %.1f %.1f %.1f" % tuple(i2t),
        "Text to image: %.1f %.1f %.1f %.1f %.1f" % tuple(t2i)]


def test_cli_optional_files(fixtures, tmp_path, capsys):
    """Without the arcs the sparse checkpoint scores the same; without the boxes, zero boxes
    (the model's own scores with zeros)."""
    name = FIXTURES[1]
    exp = np.load(fixtures / "gsmn_ref" / name / "expected.npz")
    out = {}
    for boxes, arcs in [(True, False), (False, True), (False, False)]:
        root = str(tmp_path / ("b%d_a%d" % (boxes, arcs)))
        data_path, vocab_path, ckpt, _ = fixture_dataset(root, fixtures, name, boxes, arcs)
        sims = os.path.join(root, "sims.npy")
        eval_main(capsys, "--model_path", ckpt, "--data_path", data_path, "--vocab_path",
                  vocab_path, "--split", "test", "--save_sims", sims, "--device", "cpu")
        out[boxes, arcs] = np.load(sims)
    np.testing.assert_allclose(out[True, False], exp["sims"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[False, True], out[False, False], rtol=0, atol=1e-6)
    model, opt, _, _ = evaluation.load_model(ckpt, data_path, vocab_path, "cpu")
    zero = model.score(exp["img_embs"], exp["cap_embs"], exp["cap_lens"].tolist())
    np.testing.assert_allclose(out[False, False], zero, rtol=0, atol=1e-6)


def test_cli_ensemble_dense_sparse(fixtures, tmp_path, capsys):
    """test_stack.py: the mean of the dense and the sparse models' matrices."""
    roots = [str(tmp_path / n) for n in FIXTURES]
    made = [fixture_dataset(r, fixtures, n) for r, n in zip(roots, FIXTURES)]
    data_path, vocab_path = made[0][:2]
    sims = str(tmp_path / "sims.npy")
    eval_main(capsys, "--model_path", made[0][2], "--model_path2", made[1][2], "--data_path",
              data_path, "--vocab_path", vocab_path, "--split", "test", "--save_sims", sims,
              "--device", "cpu")
    exps = [np.load(fixtures / "gsmn_ref" / n / "expected.npz")["sims"] for n in FIXTURES]
    np.testing.assert_allclose(np.load(sims), (exps[0] + exps[1]) / 2, rtol=0, atol=1e-5)


def test_recognised_and_flags(fixtures):
    ckpt = load_checkpoint(str(fixtures / "gsmn_ref" / FIXTURES[1] / "model_best.pth.tar"))
    assert matchers.recognise(ckpt, "x") == "GSMN"
    flags = gsmn.GSMN.infer_flags(ckpt["model"], ckpt["opt"])
    assert flags == {"module_name": "GSMN", "img_dim": 64, "embed_size": 32, "vocab_size": 50,
                     "word_dim": 16, "num_layers": 1, "bi_gru": True, "feat_dim": 8,
                     "num_block": 8, "hid_dim": 16, "out_dim": 1, "is_sparse": True}
    for other in matchers.classes():
        if other is not gsmn.GSMN:
            assert other.recognise(ckpt) is None


# ----------------------------------------------------------------------------- the dataset

def test_dataset_boxes_as_the_original(fixtures, tmp_path):
    """Evaluation rows: what the original's evalrank hands the model (10 divisions, row slip;
    own rows with fold5); training: the original loader's in-place division at each access,
    with the batch's last division shown by every row of an image (float32 memory sharing)."""
    name = FIXTURES[0]
    exp = np.load(fixtures / "gsmn_ref" / name / "expected.npz")
    inp = np.load(fixtures / "gsmn_ref" / name / "inputs.npz")
    data_path, vocab_path, ckpt, loc = fixture_dataset(str(tmp_path), fixtures, name)
    vocab = deserialize_vocab(os.path.join(vocab_path, "f30k_precomp_vocab.json"))
    opt = opts.parse_opt(["--module_name", "GSMN", "--batch_size", "64", "--img_dim", "64"])
    dset = gsmn.GSMN.dataset(loc, "test", vocab, opt)
    items = [dset[i] for i in range(len(dset))]
    np.testing.assert_array_equal(np.stack([items[5 * k][4].numpy() for k in range(10)]),
                                  exp["bbox_seen"])
    assert [x[1].tolist() for x in items[:3]] == [
        inp["captions"][i, :inp["lengths"][i]].tolist() for i in range(3)]
    assert dset.depends is not None and items[7][5] == json.load(
        open(os.path.join(loc, "test_caps.json")))[7]
    opt.fold5 = True
    own = gsmn.GSMN.dataset(loc, "test", vocab, opt)
    np.testing.assert_array_equal(np.stack([own[5 * k][4].numpy() for k in range(10)]),
                                  exp["bbox_per_caption"][::5].astype(np.float32))

    # training: two epochs of batches of 7 through the loader, against the original's
    sizes = np.stack([inp["image_w"], inp["image_h"]], 1)
    ref = OriginalBoxLoader(inp["bboxes"].copy(), sizes, 5)
    train_set = gsmn.GSMN.dataset(loc, "test", vocab, opt, train=True)
    order = np.random.default_rng(0).permutation(50).tolist() * 2
    for b0 in range(0, len(order), 7):
        idx = order[b0:b0 + 7]
        theirs = dict(zip(idx, torch.stack([ref.item(i) for i in idx]).numpy()))
        batch = gsmn.GSMN.collate_fn([train_set[i] for i in idx])  # sorted by length
        np.testing.assert_array_equal(batch.boxes.numpy(),
                                      np.stack([theirs[i] for i in batch.ids]))

    opt.bbox_mode = "correct"
    correct = gsmn.GSMN.dataset(loc, "test", vocab, opt)
    np.testing.assert_array_equal(correct[12][4].numpy(), exp["bbox_once"][2])
    opt.bbox_mode = "zero"
    assert not gsmn.GSMN.dataset(loc, "test", vocab, opt)[12][4].any()


@pytest.mark.parametrize("protocol", [None, 2])
def test_sizes_file_read_without_running_code(tmp_path, protocol):
    path = str(tmp_path / "s.npy")
    sizes_file(path, [500, 640], [375, 480.0], protocol)
    np.testing.assert_array_equal(gsmn.load_sizes(path, 2), [[500, 375], [640, 480]])
    np.save(path, np.array([[500, 375], [640, 480]]))
    np.testing.assert_array_equal(gsmn.load_sizes(path, 2), [[500, 375], [640, 480]])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo ran > %s" % (tmp_path / "ran"),))
    arr = np.empty(1, dtype=object)
    arr[0] = {"image_w": Evil(), "image_h": 2}
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(gsmn.errors.DataError, match="refused global"):
        gsmn.load_sizes(path, 1)
    assert not (tmp_path / "ran").exists()
    arr[0] = {"image_w": "wide", "image_h": 2}
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(gsmn.errors.DataError, match="entry 0 is not"):
        gsmn.load_sizes(path, 1)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case,fragment", [
    ("box_rows", "test_ims_bbx.npy: boxes of 9 images for the 10 images of the split"),
    ("box_shape", "test_ims_bbx.npy: boxes of shape (10, 36, 2), expected (10, 36, 4)"),
    ("size_rows", "test_ims_size.npy: 11 image sizes for the 10 images of the split"),
    ("size_only", "test_ims_bbx.npy: not found, but test_ims_size.npy is there"),
    ("arc_lines", "test_caps.json: 49 arc lists for the 50 captions of the split"),
    ("arc_index", "test_caps.json: line 3: arc [2, -1] has a negative (out-of-range) index"),
    ("arc_pair", "test_caps.json: line 1: [0, 1, 2] is not a [governor, dependent] pair"),
    ("precaps_lines", "test_precaps_stan.txt: 51 lines for the 50 captions of the split"),
    ("precaps_id", "test_precaps_stan.txt: line 2 has word id 77, outside the vocabulary's 50"),
])
def test_bad_input_files(fixtures, tmp_path, capsys, case, fragment):
    data_path, vocab_path, ckpt, loc = fixture_dataset(str(tmp_path), fixtures, FIXTURES[1])
    f = lambda n: os.path.join(loc, "test_%s" % n)  # noqa: E731
    inp = np.load(fixtures / "gsmn_ref" / FIXTURES[1] / "inputs.npz")
    arcs = json.load(open(f("caps.json")))
    if case == "box_rows":
        np.save(f("ims_bbx.npy"), inp["bboxes"][:9])
    elif case == "box_shape":
        np.save(f("ims_bbx.npy"), inp["bboxes"][:, :, :2])
    elif case == "size_rows":
        sizes_file(f("ims_size.npy"), list(inp["image_w"]) + [5], list(inp["image_h"]) + [5])
    elif case == "size_only":
        os.remove(f("ims_bbx.npy"))
    elif case == "arc_lines":
        json.dump(arcs[:49], open(f("caps.json"), "w"))
    elif case == "arc_index":
        arcs[2].append([2, -1])
        json.dump(arcs, open(f("caps.json"), "w"))
    elif case == "arc_pair":
        arcs[0][0] = [0, 1, 2]
        json.dump(arcs, open(f("caps.json"), "w"))
    elif case == "precaps_lines":
        with open(f("precaps_stan.txt"), "a") as fh:
            fh.write("1,5,2\n")
    elif case == "precaps_id":
        lines = open(f("precaps_stan.txt")).read().splitlines()
        lines[1] = "1,77,2"
        open(f("precaps_stan.txt"), "w").write("\n".join(lines) + "\n")
    _, err = eval_main(capsys, "--model_path", ckpt, "--data_path", data_path, "--vocab_path",
                       vocab_path, "--split", "test", "--device", "cpu", code=2)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


# ----------------------------------------------------------------------------- train.py

GSMN_TINY = ["--module_name", "GSMN", "--num_block", "4", "--feat_dim", "4", "--hid_dim", "8"]


def add_gsmn_files(data_path, split, n_img, n_cap, seed=0):
    rng = np.random.default_rng(seed)
    loc = os.path.join(data_path, "synth_precomp")
    xy = rng.uniform(0, 300, (n_img, 36, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (n_img, 36, 2))], 2)
    np.save(os.path.join(loc, "%s_ims_bbx.npy" % split), boxes.astype(np.float32))
    sizes_file(os.path.join(loc, "%s_ims_size.npy" % split), rng.integers(500, 640, n_img),
               rng.integers(300, 500, n_img))
    arcs = [[[0, 2]] + [[int(a), int(b)] for a, b in rng.integers(1, 8, (5, 2))]
            for _ in range(n_cap)]
    json.dump(arcs, open(os.path.join(loc, "%s_caps.json" % split), "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsmncli")
    data_path, vocab_path = tiny_dataset(str(root), n_train=8, n_dev=4, n_test=6)
    for split, n in (("train", 8), ("dev", 4), ("test", 6)):
        add_gsmn_files(data_path, split, n, 5 * n)
    run = str(root / "run")
    train.main(train_args(data_path, vocab_path, run, *GSMN_TINY, "--is_sparse",
                          "--num_epochs", "1", "--seed", "0"))
    return data_path, vocab_path, run


def test_train_and_evaluate(trained, tmp_path, capsys):
    data_path, vocab_path, run = trained
    best = os.path.join(run, "checkpoint", "model_best.pth.tar")
    ckpt = load_checkpoint(best)
    o = ckpt["opt"]
    assert (o.module_name, o.is_sparse, o.num_block, o.lambda_softmax, o.bbox_mode) == \
        ("GSMN", True, 4, 9.0, "original")
    assert [len(sd) for sd in ckpt["model"][2:]] == [18, 23]
    sims = str(tmp_path / "sims.npy")
    out, _ = eval_main(capsys, "--model_path", best, "--data_path", data_path, "--vocab_path",
                       vocab_path, "--split", "test", "--save_sims", sims, "--device", "cpu")
    assert "Images: 6, Captions: 30" in out and np.load(sims).shape == (6, 30)
    assert len(result_lines(out, RESULTS)) == 3


def test_resume_with_contradicting_is_sparse(trained, capsys, tmp_path):
    data_path, vocab_path, run = trained
    last = os.path.join(run, "checkpoint", "checkpoint_0.pth.tar")
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, str(tmp_path / "r"), *GSMN_TINY,
                              "--resume", last, "--num_epochs", "2"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert re.search(r"--is_sparse in the checkpoint.*pass --is_sparse", err), err


@pytest.mark.parametrize("flags,fragment", [
    (["--num_block", "5", "--feat_dim", "5"], "--num_block 5: does not apply to GSMN: it must "
                                              "divide --embed_size 16"),
    (["--feat_dim", "8"], "--feat_dim 8: does not apply to GSMN: it must equal --num_block 4"),
    (["--sim_dim", "8"], "--sim_dim 8: does not apply to GSMN"),
])
def test_refused_flags(trained, tmp_path, capsys, flags, fragment):
    data_path, vocab_path, _ = trained
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, str(tmp_path / "r"), *GSMN_TINY, *flags))
    assert e.value.code == 2 and fragment in capsys.readouterr().err


# ----------------------------------------------------------------------------- torchrun

def ddp_model():
    opt = opts.parse_opt(["--device", "cpu", "--grad_clip", "0", "--img_dim", "32",
                          "--embed_size", "16", "--word_dim", "8"] + GSMN_TINY +
                         ["--is_sparse"])
    opt.vocab_size = 30
    torch.manual_seed(0)
    model = gsmn.GSMN(opt)
    model.train_start()
    return model


def ddp_halves():
    """Two processes' batches of 5 pairs: (images, captions, lengths, ids, boxes, arcs)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for r in range(2):
        lens = sorted(torch.randint(3, 9, (5,), generator=g).tolist(), reverse=True)
        caps = torch.zeros(5, lens[0], dtype=torch.int64)
        for k, L in enumerate(lens):
            caps[k, :L] = torch.randint(4, 30, (L,), generator=g)
        xy = torch.rand(5, 36, 2, generator=g) * 0.7
        boxes = torch.cat([xy, xy + 0.2], 2)
        arcs = [[[0, 1], [1, 2], [2, 2]] for _ in range(5)]
        out.append((torch.randn(5, 36, 32, generator=g), caps, lens, list(range(5)), boxes,
                    arcs))
    return out


def gsmn_ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=2)
    images, captions, lens, ids, boxes, arcs = ddp_halves()[rank]
    model = ddp_model().ddp()
    model.train_emb(images, captions, lens, ids, boxes=boxes, depends=arcs)
    torch.save([p.grad.detach().clone() for p in model.params],
               os.path.join(out_dir, "rank%d.pt" % rank))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_step_gradients(tmp_path, one_thread):
    """Under torchrun the graph scorer is one DDP module: a step of 2 processes gives each
    the mean of the two single-process gradients (the textual kernel scalars: exact 0)."""
    import torch.multiprocessing as mp
    mp.spawn(gsmn_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    got = [torch.load(str(tmp_path / ("rank%d.pt" % r)), weights_only=True) for r in (0, 1)]
    per_rank = []
    for images, captions, lens, ids, boxes, arcs in ddp_halves():
        model = ddp_model()
        model.train_emb(images, captions, lens, ids, boxes=boxes, depends=arcs)
        per_rank.append([p.grad.detach().clone() for p in model.params])
    assert len(per_rank) == 2 and len(per_rank[0]) == len(model.params) > 0
    for r in range(2):
        for a, g0, g1 in zip(got[r], *per_rank, strict=True):
            torch.testing.assert_close(a, (g0 + g1) / 2, rtol=0, atol=1e-5)
