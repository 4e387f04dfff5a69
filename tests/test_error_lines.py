"""Every problem of the troubleshooting table, rendered for a real bad input, is one line of at
most 300 characters (issue 16): a line to read at a glance, quoting only the first sentence of
a library's reason. One case per key of errors.PROBLEMS (errors, warnings and reports): CASES
drive a real bad input, RENDERED render the table's line with a real case's fields (for the
problems other tests drive); a key without a case fails, so that a new message gets one. The
CASES' paths are pytest's temporary ones (about 80 characters to a split file), as long as a
user's; RENDERED's are fixed, the layout of the defaults."""
import io
import logging
import re
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import checks
import data
import errors
import evaluation
import outputs
import train
from checkpoint import load_checkpoint
from conftest import REPO
from model import SGRAF
from test_bad_input import (N_TEST, N_TRAIN, Payload, Work, base,  # noqa: F401
                            python2_checkpoint,
                            tiny_opt)
from vocab import load_vocab

LIMIT = 300


@pytest.fixture
def work(base, tmp_path):  # noqa: F811
    shutil.copytree(base, tmp_path / "w")
    return Work(tmp_path / "w")


def cli(main, argv, capsys):
    """The `error: ...` line a CLI prints for argv, and the error's key."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return e.value.__context__.key, lines[0]


def raised(fn, *args, **kwargs):
    with pytest.raises(errors.SGRAFError) as e:
        fn(*args, **kwargs)
    return e.value.key, "error: %s" % e.value


def logged(key, caplog, fn, *args):
    """The message of problem `key` (a warning or a report) that fn logs."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    fn(*args)
    fragment = max(re.split(r"\{[^}]*\}", errors.PROBLEMS[key].problem), key=len)
    return key, next(r.getMessage() for r in caplog.records if fragment in r.getMessage())


# ----------------------------------------------------------------------------- the cases

def data_dir(w, capsys, caplog):
    shutil.rmtree(w.ds)
    return cli(evaluation.main, w.eval_args(), capsys)


def split_missing(w, capsys, caplog):
    (w.ds / "test_caps.txt").unlink()
    return cli(evaluation.main, w.eval_args(), capsys)


def features_missing(w, capsys, caplog):
    return cli(checks.main, ["--features", str(w.ds / "nope_ims.npy")], capsys)


def features_unreadable(w, capsys, caplog):
    (w.ds / "test_ims.npy").write_bytes(b"\x93NUMPY\x01\x00garbage" * 3)
    return cli(evaluation.main, w.eval_args(), capsys)


def features_ndim(w, capsys, caplog):
    np.save(w.ds / "train_ims.npy", w.features().reshape(N_TRAIN, -1))
    return cli(train.main, w.train_args(), capsys)


def features_dtype(w, capsys, caplog):
    np.save(w.ds / "train_ims.npy", w.features().astype(np.int32))
    return cli(train.main, w.train_args(), capsys)


def features_empty(w, capsys, caplog):
    np.save(w.ds / "train_ims.npy", w.features()[:0])
    return cli(train.main, w.train_args(), capsys)


def features_dim(w, capsys, caplog):
    return cli(train.main, w.train_args("--img_dim", "2048"), capsys)


def features_regions(w, capsys, caplog):
    np.save(w.ds / "train_ims.npy", w.features()[:, :35])
    return cli(train.main, w.train_args(), capsys)


def features_nonfinite(w, capsys, caplog):
    feats = w.features()
    feats[data.sample_indices(N_TRAIN)[-1], 3, 5] = np.inf
    np.save(w.ds / "train_ims.npy", feats)
    return cli(train.main, w.train_args(), capsys)


def caption_count(w, capsys, caplog):
    lines = w.captions()
    w.write_captions(lines[:7] + lines[8:])
    return cli(train.main, w.train_args(), capsys)


def caption_empty(w, capsys, caplog):
    lines = w.captions()
    lines[7] = b""
    w.write_captions(lines)
    return cli(train.main, w.train_args(), capsys)


def caption_utf8(w, capsys, caplog):
    lines = w.captions()
    lines[2] = b"a dog \xff\xfe runs"
    w.write_captions(lines)
    return logged("caption_utf8", caplog, w.dataset)


def oov(w, capsys, caplog):
    return logged("oov", caplog, w.dataset)


def oov_high(w, capsys, caplog):
    from vocab import Vocabulary
    v = Vocabulary()
    for word in ("<pad>", "<start>", "<end>", "<unk>", "a"):
        v.add_word(word)
    captions = w.dataset().captions
    return logged("oov_high", caplog, data.report_oov, captions, v,
                  str(w.ds / "train_caps.txt"))


def vocab_missing(w, capsys, caplog):
    w.vocab_file.unlink()
    return cli(train.main, w.train_args(), capsys)


def vocab_invalid(w, capsys, caplog):
    w.vocab_file.write_text("{not json")
    return cli(train.main, w.train_args(), capsys)


def vocab_size(w, capsys, caplog):
    shutil.copy(REPO / "vocab" / "f30k_precomp_vocab.json", w.vocab_file)
    return cli(evaluation.main, w.eval_args(), capsys)


def ckpt_missing(w, capsys, caplog):
    return cli(evaluation.main, w.eval_args(model=w.root / "nope.pth.tar"), capsys)


def ckpt_truncated(w, capsys, caplog):
    raw = w.sgr.read_bytes()
    cut = w.root / "cut.pth.tar"
    cut.write_bytes(raw[:200])
    return cli(evaluation.main, w.eval_args(model=cut), capsys)


def ckpt_not_torch(w, capsys, caplog):
    path = w.root / "x.pth.tar"
    shutil.copy(w.ds / "test_ims.npy", path)
    return cli(evaluation.main, w.eval_args(model=path), capsys)


def ckpt_not_model(w, capsys, caplog):
    path = w.root / "x.pth.tar"
    torch.save(load_checkpoint(str(w.sgr))["model"][0], path)
    return cli(evaluation.main, w.eval_args(model=path), capsys)


def ckpt_refused(w, capsys, caplog):
    path = w.root / "evil.pth.tar"
    ckpt = load_checkpoint(str(w.sgr))
    ckpt["opt"].extra = Payload("shutil.copyfile", str(w.root / "marker"))
    torch.save(ckpt, path)
    return cli(evaluation.main, w.eval_args(model=path), capsys)


def ckpt_py2(w, capsys, caplog):
    ckpt = load_checkpoint(str(w.sgr))
    ckpt["opt"].logger_name = "runs/caf\u00e9/log"
    old = w.root / "py27.pth.tar"
    python2_checkpoint(ckpt, old)
    return cli(evaluation.main, w.eval_args(model=old), capsys)


def ckpt_mismatch(w, capsys, caplog):
    return cli(train.main, w.train_args("--resume", str(w.saf), "--embed_size", "24"), capsys)


def ckpt_foreign(w, capsys, caplog):
    ckpt = load_checkpoint(str(w.sgr))
    for sd in ckpt["model"]:
        for k in list(sd):
            sd["renamed_" + k] = sd.pop(k)
    path = w.root / "foreign.pth.tar"
    torch.save(ckpt, path)
    model = SGRAF(tiny_opt(str(w.data), str(w.vocab)))
    return raised(checkpoint.check_checkpoint_matches, model, ckpt, str(path))


def flag(*flags):
    def case(w, capsys, caplog):
        return cli(train.main, w.train_args(*flags), capsys)
    return case


def torchrun_unsupported(w, capsys, caplog):
    mp = pytest.MonkeyPatch()
    try:
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
            mp.setenv(k, v)
        return cli(train.main, w.train_args("--module_name", "NAAF", "--img_dim", "32",
                                            "--embed_size", "16", "--word_dim", "8"), capsys)
    finally:
        mp.undo()


def fold5(w, capsys, caplog):
    return cli(evaluation.main, w.eval_args("--fold5"), capsys)


def run_exists(w, capsys, caplog):
    (w.run / "checkpoint").mkdir(parents=True)
    shutil.copy(w.sgr, w.run / "checkpoint" / "checkpoint_12.pth.tar")
    return cli(train.main, w.train_args(), capsys)


def file_exists(w, capsys, caplog):
    ckpt = load_checkpoint(str(w.sgr))
    old = w.root / "py27.pth.tar"
    python2_checkpoint(ckpt, old)
    return cli(checks.main, ["--convert-py2", str(old), str(w.sgr)], capsys)


def diverged(w, capsys, caplog):
    feats = w.features()
    feats[min(set(range(N_TRAIN)) - set(data.sample_indices(N_TRAIN))), 4] = np.nan
    np.save(w.ds / "train_ims.npy", feats)
    return cli(train.main, w.train_args("--num_epochs", "1", "--seed", "1"), capsys)


def world_size(w, capsys, caplog):
    mp = pytest.MonkeyPatch()
    try:
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
            mp.setenv(k, v)
        return cli(train.main, w.train_args("--world_size", "3"), capsys)
    finally:
        mp.undo()


def features_zero_region(w, capsys, caplog):
    feats = w.features()
    feats[data.sample_indices(N_TRAIN)[0], 3] = 0
    return logged("features_zero_region", caplog, data.warn_zero_regions, feats,
                  str(w.ds / "train_ims.npy"))


def _image_files(w, images, ids=None, n_images=10):
    import retrieve
    return raised(retrieve.ImageFiles, str(images), ids and str(ids), str(w.ds), "test",
                  n_images, 5)


def images_dir(w, capsys, caplog):
    return _image_files(w, w.root / "no_such_images")


def _images(w, names=()):
    d = w.root / "the_split_s_images"
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"")
    return d


def image_ids_missing(w, capsys, caplog):
    return _image_files(w, _images(w))


def _ids(w, lines):
    path = w.root / "test_image_ids.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def image_file(w, capsys, caplog):
    return _image_files(w, _images(w), _ids(w, ["1000092795"] * 10))


def boxes_missing(w, capsys, caplog):
    names = ["%d.jpg" % k for k in range(10)]
    return _image_files(w, _images(w, names), _ids(w, names))


def boxes_shape(w, capsys, caplog):
    names = ["%d.jpg" % k for k in range(10)]
    np.save(w.ds / "test_ims_bbx.npy", np.zeros((9, 36, 4), np.float32))
    return _image_files(w, _images(w, names), _ids(w, names))


def output_unwritable(w, capsys, caplog):
    (w.root / "a_file").write_text("not a directory")
    return cli(evaluation.main, w.eval_args("--plots", str(w.root / "a_file" / "plots")),
               capsys)


def cache_unwritable(w, capsys, caplog):  # a warning: the query is answered uncached
    import retrieve
    (w.root / "a_file").write_text("not a directory")
    return logged("cache_unwritable", caplog, retrieve.main,
                  w.eval_args("--query", "a dog", "--cache_dir",
                              str(w.root / "a_file" / "cache")))


def save_sims(w, *extra):
    return w.eval_args("--save_sims", str(w.root / "sims_of_the_test_split.npy"), *extra)


def output_dir(w, capsys, caplog):
    return cli(evaluation.main, w.eval_args("--save_sims", str(w.root / "no" / "s.npy")),
               capsys)


def output_not_ours(w, capsys, caplog):
    np.save(w.root / "sims_of_the_test_split.npy", np.zeros(3))
    return cli(evaluation.main, save_sims(w), capsys)


def output_other_run(w, capsys, caplog):
    evaluation.main(save_sims(w))
    return cli(evaluation.main, save_sims(w, "--precision", "bf16"), capsys)


def output_busy(w, capsys, caplog):
    evaluation.main(save_sims(w))
    path = str(w.root / "sims_of_the_test_split.npy")
    held = outputs.claim_output(path, outputs.read_record(path + ".record")[0]["identity"], "x")
    try:
        return cli(evaluation.main, save_sims(w), capsys)
    finally:
        held.close()


def sims_rescored(w, capsys, caplog):
    evaluation.main(save_sims(w))
    path = str(w.root / "sims_of_the_test_split.npy")
    sims = np.load(path, mmap_mode="r+")
    sims[:3] = 0.0  # three rows lost
    sims.flush()
    del sims
    with open(path + ".record", "a") as f:
        f.write('{"done": null}\n')
    return logged("sims_rescored", caplog, evaluation.main, save_sims(w))


def cache_damaged(w, capsys, caplog):
    import retrieve
    args = w.eval_args("--query", "a dog", "--cache_dir", str(w.root / "cache"))
    retrieve.main(args)
    entry = next(p for p in (w.root / "cache").iterdir() if p.is_dir())
    with open(entry / "images.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    return logged("cache_damaged", caplog, retrieve.main, args)


def unsampled_test_image():
    return next(i for i in range(N_TEST) if i not in set(data.sample_indices(N_TEST)))


def embeddings_nonfinite(w, capsys, caplog):
    feats = w.features("test")
    feats[unsampled_test_image(), 2, 1] = np.nan  # not among the start-up sample
    np.save(w.ds / "test_ims.npy", feats)
    return cli(evaluation.main, w.eval_args(), capsys)


def features_pickled(w, capsys, caplog):
    objects = np.empty(N_TEST, dtype=object)
    objects[:] = [np.zeros((36, 32), np.float32) for _ in range(N_TEST)]
    np.save(w.ds / "test_ims.npy", objects, allow_pickle=True)
    return cli(evaluation.main, w.eval_args(), capsys)


def oov_refused(w, capsys, caplog):
    text = (w.ds / "test_caps.txt").read_text(encoding="utf-8")
    (w.ds / "test_caps.txt").write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    return cli(evaluation.main, w.eval_args(), capsys)


# --- a matcher's optional input files (the graph matcher's word ids, boxes, sizes, arcs)

def gsmn_dataset(w, split="test", **flags):
    import gsmn
    from types import SimpleNamespace
    opt = SimpleNamespace(**dict(dict(feat_format="auto", img_dim=None, bbox_mode="original",
                                       batch_size=10, fold5=False, is_sparse=False), **flags))
    vocab = load_vocab(str(w.vocab_file))
    return gsmn.GSMNDataset(str(w.ds), split, vocab, opt)


def boxes(w, n, regions=36, split="test"):
    np.save(w.ds / ("%s_ims_bbx.npy" % split), np.ones((n, regions, 4), np.float32))


def sizes(w, n, split="test"):
    np.save(w.ds / ("%s_ims_size.npy" % split), np.full((n, 2), 100.0))


def input_count(w, capsys, caplog):
    boxes(w, 9)
    sizes(w, 10)
    return raised(gsmn_dataset, w)


def input_shape(w, capsys, caplog):
    boxes(w, 10, regions=35)
    sizes(w, 10)
    return raised(gsmn_dataset, w)


def input_invalid(w, capsys, caplog):
    (w.ds / "test_ims_bbx.npy").write_bytes(b"\x93NUMPY\x01\x00garbage" * 3)
    sizes(w, 10)
    return raised(gsmn_dataset, w)


def input_unpaired(w, capsys, caplog):
    boxes(w, 10)
    return raised(gsmn_dataset, w)


def input_required(w, capsys, caplog):
    return raised(gsmn_dataset, w, bbox_mode="correct")


# --- the BERT of the fourth matcher (--bert_path)

BERT_DEMO = REPO / "bert_demo"
BERT_FLAGS = ["--module_name", "HREM", "--bert_path", str(BERT_DEMO), "--bert_init", "random",
              "--nhead", "4", "--val_split", "dev"]


def bert(*flags, path=None, init=None):
    """train.main with the fourth matcher; `path(w)` makes the --bert_path directory."""
    def case(w, capsys, caplog):
        extra = list(flags)
        if path is not None:
            extra += ["--bert_path", str(path(w))]
        if init is not None:
            extra += ["--bert_init", init]
        return cli(train.main, w.train_args(*BERT_FLAGS, *extra), capsys)
    return case


def bert_dir(w, config=True, vocab=True, weights=None, config_text=None):
    d = w.root / "models" / "bert-base-uncased-copy"
    d.mkdir(parents=True)
    if config:
        (d / "config.json").write_text(config_text or (BERT_DEMO / "config.json").read_text())
    if vocab:
        shutil.copy(BERT_DEMO / "vocab.txt", d / "vocab.txt")
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


def bert_small_config(w):
    cfg = (BERT_DEMO / "config.json").read_text().replace('"vocab_size": 193', '"vocab_size": 50')
    return bert_dir(w, config_text=cfg)


def bert_mismatch(w, capsys, caplog):
    import hrem
    import opts
    opt = opts.parse_opt(BERT_FLAGS + ["--img_dim", "32", "--embed_size", "16", "--device",
                                       "cpu"])
    tok, _ = hrem.HREM.vocabulary(opt)
    opt.vocab_size = len(tok)
    model = hrem.HREM(opt)
    one_layer = {k: v for k, v in model.txt_enc.state_dict().items() if ".layer.1." not in k}
    ckpt = {"model": [model.img_enc.state_dict(), one_layer]}
    return raised(model.check_checkpoint, ckpt, str(w.run / "checkpoint" / "model_best.pth.tar"))


CASES = {
    "data_dir": data_dir, "split_missing": split_missing, "features_missing": features_missing,
    "features_unreadable": features_unreadable, "features_ndim": features_ndim,
    "features_dtype": features_dtype, "features_empty": features_empty,
    "features_dim": features_dim, "features_regions": features_regions,
    "features_nonfinite": features_nonfinite, "caption_count": caption_count,
    "caption_empty": caption_empty, "caption_utf8": caption_utf8, "oov": oov,
    "oov_high": oov_high, "vocab_missing": vocab_missing, "vocab_invalid": vocab_invalid,
    "vocab_size": vocab_size, "ckpt_missing": ckpt_missing, "ckpt_truncated": ckpt_truncated,
    "ckpt_not_torch": ckpt_not_torch, "ckpt_not_model": ckpt_not_model,
    "ckpt_refused": ckpt_refused, "ckpt_py2": ckpt_py2, "ckpt_mismatch": ckpt_mismatch,
    "ckpt_foreign": ckpt_foreign, "flag_positive": flag("--batch_size", "0"),
    "flag_nonnegative": flag("--workers", "-1"), "lr_update": flag("--lr_update", "0"),
    "learning_rate": flag("--learning_rate", "0"), "margin": flag("--margin", "-0.2"),
    "module_name": flag("--module_name", "sgr"),
    "flag_unsupported": flag("--module_name", "NAAF", "--sgr_step", "2"),
    "torchrun_unsupported": torchrun_unsupported, "batch_one": flag("--batch_size", "1"),
    "batch_remainder": flag("--batch_size", "11"), "fold5": fold5, "run_exists": run_exists,
    "file_exists": file_exists, "diverged_nonfinite": diverged,
    "images_dir": images_dir, "image_ids_missing": image_ids_missing, "image_file": image_file,
    "boxes_missing": boxes_missing, "boxes_shape": boxes_shape,
    "output_unwritable": output_unwritable, "cache_unwritable": cache_unwritable, "world_size": world_size,
    "features_zero_region": features_zero_region, "output_dir": output_dir,
    "output_not_ours": output_not_ours, "output_other_run": output_other_run,
    "output_busy": output_busy, "sims_rescored": sims_rescored, "cache_damaged": cache_damaged,
    "embeddings_nonfinite": embeddings_nonfinite, "features_pickled": features_pickled,
    "oov_refused": oov_refused,
    "input_count": input_count, "input_shape": input_shape, "input_invalid": input_invalid,
    "input_unpaired": input_unpaired, "input_required": input_required,
    "bert_missing": bert(path=lambda w: w.root / "models" / "no-such-bert"),
    "bert_not_model_dir": bert(path=lambda w: w.vocab),
    "bert_config": bert(path=lambda w: bert_dir(w, config_text="{not json")),
    "bert_no_vocab": bert(path=lambda w: bert_dir(w, vocab=False)),
    "bert_offline": bert("--bert_path", "bert-base-uncased"),
    "bert_unreadable": bert(path=lambda w: bert_dir(w, weights=b"garbage" * 10),
                            init="pretrained"),
    "bert_weights": bert(init="pretrained"),
    "bert_vocab": bert(path=bert_small_config),
    "bert_mismatch": bert_mismatch,
    "flag_divides": bert("--nhead", "5"), "flag_range": bert("--threshold", "0.05"),
    "batch_too_large": bert("--batch_size", "200"),
}


# --- the problems rendered from the table: tests/test_cli_mistakes.py and
# tests/test_search_and_pictures.py raise them for real bad inputs, but with relative paths
# or pytest's; here each is rendered as a user would see it, with the fields a real case gives:
# a user's absolute paths (fixed, so that no line depends on the temporary folder's length)
# and a library's reason at its longest

def rendered(key, fields, where="{path}"):
    """A case that renders problem `key` from the table: `fields` names each of its fields'
    representative value (REPRESENTATIVE), `where` is formatted with them."""
    def case(w, capsys, caplog):
        p = errors.PROBLEMS[key]
        names = set(re.findall(r"\{(\w+)", p.problem + p.fix)) - {"where"}
        assert names == set(fields), (key, sorted(names))  # the table changed: update the row
        kw = {name: REPRESENTATIVE[field] for name, field in fields.items()}
        at = where.format(**REPRESENTATIVE)
        line = "error: %s" % errors.message(key, at, **kw)
        # the where is whole, and every word of the problem's and the fix's own text is kept (a
        # long path among the fields may be shortened in the middle: errors.shorten_path)
        assert line.startswith("error: %s: " % at), line
        for part in re.split(r"\{\w+\}", p.problem + "\0" + p.fix):
            for piece in part.split("\0"):
                assert piece.strip() in line, (piece, line)
        return key, line
    return case


RUN = "runs/f30k_precomp_SAF"  # the layout of the defaults (evaluation.DEFAULT_MODEL_PATH)
REPRESENTATIVE = {
    "path": RUN + "/checkpoint/model_best.pth.tar", "run_dir": RUN + "/checkpoint",
    "ckpt": RUN + "/checkpoint/checkpoint_3.pth.tar", "ckpt_name": "checkpoint_3.pth.tar",
    "latest": RUN + "/checkpoint/checkpoint_5.pth.tar",
    "later": "checkpoint_5.pth.tar and 1 more",
    "data": "data", "split_dir": "data/f30k_precomp", "file": "data/f30k_precomp/train_ims.npy",
    "caps": "data/f30k_precomp/test_caps.txt", "dir": "runs/demo", "log": RUN + "/log",
    "sims": RUN + "/sims_test.npy", "cache": "/home/username/.cache/sgraf/retrieve",
    "reason": "r" * errors.REASON_CHARS, "name": "f30k_precomp", "split": "test",
    "n": 1000, "m": 5000, "epochs": 40, "iteration": 43210, "region": 35,
    "files": "checkpoint_4.pth.tar, checkpoint_5.pth.tar and model_best.pth.tar",
    "run": "the run of --model_name runs/f30k_precomp_SGR/checkpoint",
    "what": "loss is nan", "flag": "--save_sims", "model": "GSMN",
    "tool": "evaluation.py --save_sims", "choices": "SAF, SGR, NAAF, GSMN, HREM",
    "unknown": "module XYZ", "splits": "train dev test", "devices": "cpu",
    "why": "the checkpoint's own --img_dim", "other": "--max_len 20",
    "diff": "n_train 40 (asked 20), seed 0 (asked 1)",
    "shipped": "file vocab/f30k_precomp_vocab.json",
    "vocab_alt": "another --vocab_path, e.g. runs/vocab",
    "expected": "a directory, e.g. %s/checkpoint" % RUN, "kind": "dataset",
    "why_not": "its similarity is computed on graph nodes, not words and regions",
    # download.py's (its tests drive each for a real bad input through a loopback server)
    "item": "sgraf-f30k", "close": " (did you mean sgraf-f30k?)", "count": 2,
    "zip": "data.zip", "url": "https://iudata.blob.core.windows.net/scan/data.zip",
    "alt": " (or from https://www.kaggle.com/datasets/kuanghueilee/scan-features)",
    "size": "8.5 GB", "part": "data/.data.zip.partial", "source": "the table",
    "digest": "0123456789ab", "dl_flag": "--data_path", "free": "2.1 GB",
    "resume": ": it continues from data/.data.zip.partial", "module": "SGR",
    "refetch": "the download was removed: run again, or fetch it yourself and pass --from_file "
               "data.zip",
    # tests/test_runs.py's
    "pid": 4194303, "run_flag": "--model_name", "os_reason": "no space left on device",
    "kept": "checkpoint_2.pth.tar is intact and model_best.pth.tar of epoch 2 is intact",
    "write_fix": "free some space, then continue with --resume %s/checkpoint/"
                 "checkpoint_2.pth.tar" % RUN,
    "saved": RUN + "/checkpoint/checkpoint_3.pth.tar (epoch 4) is saved",
    "how": "continue with the same command and --resume %s/checkpoint/checkpoint_3.pth.tar"
           % RUN,
    "layout": "f30k_precomp/ or coco_precomp/ with {split}_ims.npy and {split}_caps.txt",
    "indices": "1, 11, 12, 14, 15, 17 ... (9 in all)",
    # two-stage retrieval's (tests/test_two_stage.py drives each for a real bad input)
    "shortlist_why": "it scores each pair by cross-attention, with no vector per image and "
                     "per caption",
    "reads": "coco_precomp testall", "reads_ours": "f30k_precomp test", "k": 2000,
    "direction": "text to image", "items": "images",
}


RENDERED = {
    # tests/test_runs.py drives these
    "run_busy": rendered("run_busy", {"pid": "pid", "flag": "run_flag"},
                         "--model_name {run_dir}"),
    "write_failed": rendered("write_failed", {"reason": "os_reason", "kept": "kept",
                                              "fix": "write_fix"}, "{ckpt}"),
    "interrupted": rendered("interrupted", {"saved": "saved", "how": "how"}, "train.py"),
    "data_dir_nested": rendered("data_dir_nested", {"parent": "split_dir", "split": "split",
                                                    "above": "data", "name": "name"},
                                 "--data_path {split_dir}"),
    "eval_captions": rendered("eval_captions", {"n_caps": "n", "n_images": "n"}, "{caps}"),
    "resume_done": rendered("resume_done", {"path": "ckpt", "epochs": "epochs"},
                            "--num_epochs 40"),
    "world_size_plain": rendered("world_size_plain", {"want": "n"}, "--world_size 4"),
    "arguments": rendered("arguments", {"reason": "reason"}, "train.py"),
    "flag_min": rendered("flag_min", {"minimum": "n", "why": "why"}, "--batch 1"),
    "flag_order": rendered("flag_order", {"other": "other", "limit": "n"}, "--min_len 30"),
    "flag_choice": rendered("flag_choice", {"unknown": "unknown", "choices": "choices"},
                            "--modules SGR,XYZ"),
    "split_name": rendered("split_name", {"suggest": "splits"}, "--splits train_ims.npy"),
    "device": rendered("device", {"reason": "reason"}, "--device gpu"),
    "device_unavailable": rendered("device_unavailable", {"reason": "reason",
                                                          "available": "devices"},
                                   "--device cuda:1"),
    "data_name": rendered("data_name", {"head": "data", "tail": "name"},
                          "--data_name {data}/synth_precomp"),
    "path_not_dir": rendered("path_not_dir", {"found": "file", "expected": "expected"},
                             "--model_name {file}"),
    "path_not_file": rendered("path_not_file", {"expected": "file"}, "--features {data}"),
    "dir_missing": rendered("dir_missing", {"expected": "expected"}, "--data_path {data}"),
    "file_shipped": rendered("file_shipped", {"what": "shipped", "alternative": "vocab_alt"},
                             "vocab/f30k_precomp_vocab.json"),
    "run_later": rendered("run_later", {"found": "later", "resumed": "ckpt_name",
                                        "latest": "latest"}, "--model_name {run_dir}"),
    "log_exists": rendered("log_exists", {"owner": "run"}, "--logger_name {log}"),
    "run_dir": rendered("run_dir", {"found": "files", "whose": "run"}, "--run_dir {dir}"),
    "synthetic_mismatch": rendered("synthetic_mismatch", {"diff": "diff"}, "{split_dir}"),
    "dataset_foreign": rendered("dataset_foreign", {"found": "files"}, "{split_dir}"),
    "diverged": rendered("diverged", {"what": "what", "iteration": "iteration", "last": "ckpt"},
                         "{run_dir}"),
    "diverged_start": rendered("diverged_start", {"what": "what", "iteration": "iteration"},
                               "{run_dir}"),
    "diverged_zero_region": rendered("diverged_zero_region", {
        "image": "n", "region": "region", "iteration": "iteration", "what": "what"}, "{file}"),
    "file_not_made": rendered("file_not_made", {"tool": "tool", "flag": "flag"}, "{sims}"),
    "query_empty": rendered("query_empty", {}, "--query \" \""),
    "image_index": rendered("image_index", {"split": "split", "n_images": "n", "last": "n"},
                            "--image 1000"),
    "explain_unsupported": rendered("explain_unsupported", {"model": "model",
                                                            "why": "why_not"}, "--explain"),
    "cache_inside": rendered("cache_inside", {"what": "kind", "inside": "split_dir",
                                              "default": "cache"}, "{split_dir}/cache"),
    "image_ids_count": rendered("image_ids_count", {"n_lines": "n", "n_images": "m"},
                                "{data}/ids.txt"),
    "item_unknown": rendered("item_unknown", {"close": "close"}, "sgraf-f30"),
    "from_file_names": rendered("from_file_names", {"count": "count"}, "--from_file {zip}"),
    "from_file_missing": rendered("from_file_missing", {}, "--from_file {zip}"),
    "gdown_missing": rendered("gdown_missing", {"file": "zip"}, "{item}"),
    "download_unreachable": rendered("download_unreachable", {
        "url": "url", "reason": "reason", "alt": "alt", "file": "zip"}, "{item}"),
    "download_interrupted": rendered("download_interrupted", {
        "url": "url", "have": "free", "total": "size", "reason": "reason", "part": "part"},
        "{item}"),
    "download_busy": rendered("download_busy", {}, "{part}"),
    "download_size": rendered("download_size", {"what": "url", "got": "m", "source": "source",
                                                "expected": "n", "fix": "refetch"}, "{item}"),
    "download_sha256": rendered("download_sha256", {"what": "zip", "got": "digest",
                                                    "expected": "digest", "fix": "refetch"},
                                "{item}"),
    "disk_space": rendered("disk_space", {"need": "size", "what": "zip", "free": "free",
                                          "flag": "dl_flag"}, "--data_path {data}"),
    "disk_full": rendered("disk_full", {"what": "zip", "reason": "reason", "resume": "resume"},
                          "{part}"),
    "archive_invalid": rendered("archive_invalid", {"what": "zip", "reason": "reason",
                                                    "fix": "refetch"}, "{item}"),
    "archive_layout": rendered("archive_layout", {"what": "zip", "expected": "layout",
                                                  "fix": "refetch"}, "{item}"),
    "ckpt_download_invalid": rendered("ckpt_download_invalid", {
        "what": "path", "reason": "reason", "fix": "refetch"}, "{item}"),
    "ckpt_download_other": rendered("ckpt_download_other", {
        "expected": "module", "found": "model", "fix": "refetch"}, "{item}"),
    "data_check": rendered("data_check", {"count": "count"}, "--data_path {data}"),
    "shortlist_unsupported": rendered("shortlist_unsupported", {"model": "module",
                                                                "why": "shortlist_why"},
                                      "--shortlist {path}"),
    "rerank_needs_shortlist": rendered("rerank_needs_shortlist", {}, "--rerank_k 16,32,64,128"),
    "shortlist_needs_k": rendered("shortlist_needs_k", {}, "--shortlist {path}"),
    "shortlist_split": rendered("shortlist_split", {"theirs": "reads", "ours": "reads_ours"},
                                "--shortlist {path}"),
    "rerank_k_gallery": rendered("rerank_k_gallery", {"k": "k", "direction": "direction",
                                                      "n": "n", "items": "items"},
                                 "--rerank_k 2000"),
    "scores_nonfinite": rendered("scores_nonfinite", {"images": "indices",
                                                      "captions": "indices"},
                                 "the similarity matrix"),
}


@pytest.mark.parametrize("key", list(errors.PROBLEMS))
def test_every_line_of_the_table_is_short(key, work, capsys, caplog):
    assert key in CASES or key in RENDERED, \
        "add a case that renders %r for a real bad input" % key
    got, line = (CASES.get(key) or RENDERED[key])(work, capsys, caplog)
    with capsys.disabled():
        print("\nLINE %d %s" % (len(line), line))
    assert got == key, (got, line)
    assert "\n" not in line
    assert len(line) <= LIMIT, (len(line), line)


def test_a_library_reason_is_its_first_sentence():
    long = ("PytorchStreamReader failed reading zip archive: failed finding central directory. "
            "This is an internal miniz error. If you are seeing this error, there is a high "
            "likelihood that your checkpoint file is corrupted.")
    assert errors.first_line(RuntimeError(long)) == \
        "PytorchStreamReader failed reading zip archive: failed finding central directory"
    assert errors.first_line(ValueError("x" * 500)).endswith("...")
    assert len(errors.first_line(ValueError("x" * 500))) == errors.REASON_CHARS
    assert errors.first_line(KeyError("idx")) == "'idx'"
    assert errors.first_line(io.UnsupportedOperation()) == "UnsupportedOperation"
