"""download.py (issue 25): fetch, verify and install SCAN's data, vocabularies and the authors'
checkpoints; `--list`; `--check`.

Nothing here touches the internet. Plain downloads come from a loopback HTTP server started by
the test (127.0.0.1, a free port, Range requests, a bound on requests, stopped by itself) that
counts the bytes it serves, through `--mirror`; the Google Drive path is tested up to the call
into gdown (gdown.download / gdown.download_folder replaced by fakes that record their
arguments). The zips hold a tiny SCAN-layout dataset made by synthetic.py, and the checkpoints
are untrained tiny SGR and SAF models.
"""
import errno
import fcntl
import hashlib
import http.server
import io
import os
import shlex
import shutil
import socket
import tarfile
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import download
import errors
import evaluation
import matchers
import opts
import releases
import vocab
from conftest import REPO
from helpers import ERROR_LINE_LIMIT, assert_unchanged, snapshot, tiny_dims
from synthetic import make_synthetic

# every released checkpoint of the five READMEs (SGRAF, DAA, NAAF, GSMN, HREM), and SCAN's zips
RELEASED = {"sgraf-f30k", "sgraf-coco", "daa-coco-sgr", "daa-coco-saf", "daa-f30k-sgr",
            "daa-f30k-saf", "naaf-f30k-glove", "naaf-f30k", "gsmn-f30k-dense",
            "gsmn-f30k-sparse", "gsmn-extras", "hrem-f30k", "hrem-coco"}
N_TEST = 10  # images of the tiny test split (50 captions)
MAX_REQUESTS = 40  # per server: a client that loops is stopped, not waited for


# ----------------------------------------------------------------------------- the server

class Server:
    """A loopback HTTP server for `files` ({name: bytes}) with HEAD, GET and Range, in a daemon
    thread. `cut`: the next GET sends only this many body bytes and drops the connection.
    `served`: the body bytes sent by GETs; `ranges`: the Range headers received."""

    def __init__(self, files):
        self.files, self.cut, self.served, self.ranges, self.requests = dict(files), None, 0, [], 0
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *a):
                pass

            def _head(self, body_wanted):
                srv.requests += 1
                name = self.path.lstrip("/")
                if srv.requests > MAX_REQUESTS or name not in srv.files:
                    self.send_error(404 if name not in srv.files else 503)
                    return None
                body = srv.files[name]
                rng = self.headers.get("Range")
                start = 0
                if rng:
                    srv.ranges.append(rng)
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", "bytes */%d" % len(body))
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    self.send_response(206)
                    self.send_header("Content-Range", "bytes %d-%d/%d"
                                     % (start, len(body) - 1, len(body)))
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                return body[start:]

            def do_HEAD(self):
                self._head(False)

            def do_GET(self):
                body = self._head(True)
                if body is None:
                    return
                if srv.cut is not None:
                    body, srv.cut = body[:srv.cut], None
                    self.close_connection = True
                self.wfile.write(body)
                srv.served += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    servers = []

    def start(files):
        servers.append(Server(files))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """No waiting between retries, short timeouts, no free-space margin to find."""
    monkeypatch.setattr(download, "RETRY_WAITS", ())
    monkeypatch.setattr(download, "TIMEOUT", 10)


# ----------------------------------------------------------------------------- the files

def tiny_checkpoint(path, data_path, vocab_path, module):
    opt = opts.parse_opt(["--data_path", data_path, "--data_name", "f30k_precomp",
                          "--vocab_path", vocab_path, "--module_name", module,
                          "--device", "cpu", "--workers", "0"] + tiny_dims(module))
    opt.vocab_size = len(vocab.load_vocab(os.path.join(vocab_path, "f30k_precomp_vocab.json")))
    checkpoint.save_checkpoint({"epoch": 1, "model": matchers.build_model(opt).state_dict(),
                     "best_rsum": 0.0, "opt": opt, "Eiters": 0}, False,
                    filename=os.path.basename(path), prefix=os.path.dirname(path) + "/")
    return Path(path).read_bytes()


def zip_bytes(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The files a server offers: SCAN-layout data.zip and vocab.zip of a tiny f30k_precomp,
    SGR and SAF checkpoints of its dims, SGRAF's archive of both (with a log)."""
    root = tmp_path_factory.mktemp("download_src")
    data_path, vocab_path = str(root / "data"), str(root / "vocab")
    make_synthetic(data_path, "f30k_precomp", vocab_path, seed=0, n_train=20, n_dev=10,
                   n_test=N_TEST, img_dim=32)
    f = {}
    f["data"] = {"data/f30k_precomp/%s" % n: (root / "data" / "f30k_precomp" / n).read_bytes()
                 for n in sorted(os.listdir(root / "data" / "f30k_precomp"))}
    f["vocab"] = {"vocab/f30k_precomp_vocab.json":
                  (root / "vocab" / "f30k_precomp_vocab.json").read_bytes()}
    f["data.zip"], f["vocab.zip"] = zip_bytes(f["data"]), zip_bytes(f["vocab"])
    for module in ("SGR", "SAF"):
        f[module] = tiny_checkpoint(str(root / ("%s.pth.tar" % module)), data_path, vocab_path,
                                    module)
    f["sgraf-f30k.zip"] = zip_bytes({"SGRAF_f30k/SGR/model_best.pth.tar": f["SGR"],
                                     "SGRAF_f30k/SAF/model_best.pth.tar": f["SAF"],
                                     "SGRAF_f30k/SGR/train.log": b"epoch 1\n"})
    return f


def run(argv, capsys):
    """(exit code, stdout, the error line or None) of download.main(argv)."""
    capsys.readouterr()
    try:
        code = download.main(argv)
        err = None
    except SystemExit as e:
        code, err = e.code, e.__context__
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    lines = [line for line in out.err.splitlines() if line.startswith("error:")]
    if err is not None:
        assert len(lines) == 1 and lines[0] == "error: %s" % err, out.err
        assert len(lines[0]) <= ERROR_LINE_LIMIT, (len(lines[0]), lines[0])
    return code, out.out, err


def refused(argv, capsys, key, *fragments, root=None):
    """download.main(argv) exits 2 with one `error:` line of problem `key`, holding the
    fragments; every file under `root` that existed before is byte-identical."""
    before = snapshot(root) if root else None
    code, _, err = run(argv, capsys)
    assert code == 2 and err is not None and err.key == key, (code, err)
    assert isinstance(err, errors.PROBLEMS[key].cls)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    if root:
        assert_unchanged(before, root)
    return str(err)


def paths(tmp_path):
    return ["--data_path", str(tmp_path / "data"), "--vocab_path", str(tmp_path / "vocab"),
            "--dest", str(tmp_path / "released")]


def leftovers(root):
    """Partial, staging and download files left under root."""
    return [str(p) for p in Path(root).rglob("*") if p.name.endswith(
        (".part", ".staging", ".gdown", ".replaced"))]


# ----------------------------------------------------------------------------- --list

def test_list_has_every_release_and_each_command_parses(capsys, monkeypatch):
    names = [it.name for it in releases.ITEMS]
    assert len(names) == len(set(names))
    assert {"scan-data", "scan-vocab"} | RELEASED == set(names)
    code, out, _ = run(["--list"], capsys)
    assert code == 0
    seen = []
    monkeypatch.setattr(evaluation, "evalrank", lambda *a, **k: seen.append((a, k)))
    for it in releases.ITEMS:
        assert it.name in out and it.url in out
        assert it.url.startswith("https://")
        if it.kind == "checkpoint":
            assert it.results, it.name
            assert download.drive_id(it.url), it.url
        for r in it.results:
            assert r.published in out and r.command in out
            argv = shlex.split(r.command)
            assert argv[:2] == ["python", "evaluation.py"]
            seen.clear()
            evaluation.main(argv[2:])  # evaluation.py's own parser; evalrank is not run
            (model_path,), kw = seen[0]
            installed = {releases.ckpt_path(releases.DEFAULT_DEST, n, m)
                         for n, m in [(x.name, m) for x in releases.ITEMS for m in x.modules]}
            assert model_path in installed, model_path
            assert kw["model_path2"] in installed | {None}
            assert kw["split"] in ("test", "testall")
            assert it.dataset.startswith("coco") == (kw["split"] == "testall")


def test_the_docs_show_the_table_as_list_prints_it():
    text = (REPO / "docs" / "download.md").read_text(encoding="utf-8")
    assert "```\n%s\n```" % releases.list_table() in text


# ----------------------------------------------------------------------------- installing

def test_zips_unpack_into_the_layout_and_evaluation_runs(src, serve, tmp_path, capsys):
    srv = serve({"data.zip": src["data.zip"], "vocab.zip": src["vocab.zip"],
                 "sgraf-f30k.zip": src["sgraf-f30k.zip"]})
    code, out, _ = run(["scan-data", "scan-vocab", "sgraf-f30k", "--mirror", srv.url] +
                       paths(tmp_path), capsys)
    assert code == 0
    for name, payload in list(src["data"].items()) + list(src["vocab"].items()):
        assert (tmp_path / name).read_bytes() == payload, name
    released = tmp_path / "released" / "sgraf-f30k"
    assert (released / "SGR.pth.tar").read_bytes() == src["SGR"]
    assert (released / "SAF.pth.tar").read_bytes() == src["SAF"]
    assert (released / "SGRAF_f30k" / "SGR" / "train.log").read_bytes() == b"epoch 1\n"
    assert not leftovers(tmp_path)
    assert srv.served == sum(len(src[n]) for n in ("data.zip", "vocab.zip", "sgraf-f30k.zip"))

    # the SGRAF command of --list, on what was installed
    cmd = next(r.command for r in releases.ITEMS[2].results if r.label == "SGRAF")
    argv = [a.replace("runs/released", str(tmp_path / "released")) for a in
            shlex.split(cmd)[2:]]
    argv[argv.index("--data_path") + 1] = str(tmp_path / "data")
    argv[argv.index("--vocab_path") + 1] = str(tmp_path / "vocab")
    capsys.readouterr()
    evaluation.main(argv + ["--device", "cpu"])
    printed = capsys.readouterr().out
    assert "rsum:" in printed and "Images: %d, Captions: %d" % (N_TEST, 5 * N_TEST) in printed

    # the same again: the dataset is there, refused before a byte is fetched
    served = srv.served
    refused(["scan-data", "--mirror", srv.url] + paths(tmp_path), capsys, "file_exists",
            "f30k_precomp", "--overwrite", root=tmp_path)
    refused(["sgraf-f30k", "--mirror", srv.url] + paths(tmp_path), capsys, "file_exists",
            "sgraf-f30k", root=tmp_path)
    assert srv.served == served


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_gsmn_extras_go_beside_the_splits_and_a_tar_is_an_archive_too(src, serve, layout,
                                                                      capsys):
    boxes = npy_bytes(np.ones((N_TEST, 36, 4), np.float32))
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as tf:
        for name, payload in (("SGRAF_f30k/SGR/model_best.pth.tar", src["SGR"]),
                              ("SGRAF_f30k/SAF/model_best.pth.tar", src["SAF"])):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    srv = serve({"gsmn-extras.zip": zip_bytes({"GSMN/f30k_precomp/test_ims_bbx.npy": boxes,
                                               "GSMN/README.txt": b"not an extra"}),
                 "sgraf-f30k.zip": tar.getvalue()})
    shutil.rmtree(layout / "released")
    code, out, _ = run(["gsmn-extras", "sgraf-f30k", "--mirror", srv.url] + paths(layout),
                       capsys)
    assert code == 0
    ds = layout / "data" / "f30k_precomp"
    assert (ds / "test_ims_bbx.npy").read_bytes() == boxes
    assert not (ds / "README.txt").exists() and not (layout / "data" / "GSMN").exists()
    assert (layout / "released" / "sgraf-f30k" / "SAF.pth.tar").read_bytes() == src["SAF"]
    assert not leftovers(layout)
    code, out, _ = check(layout, capsys)
    assert code == 0 and "GSMN extras: ims_bbx.npy" in out
    assert "sgraf-f30k SGRAF: ready" in out


def test_a_killed_download_fetches_only_the_rest(src, serve, tmp_path, capsys):
    ckpt = src["SGR"]
    srv = serve({"daa-f30k-sgr.pth.tar": ckpt})
    half = len(ckpt) // 2
    srv.cut = half
    refused(["daa-f30k-sgr", "--mirror", srv.url] + paths(tmp_path), capsys,
            "download_interrupted", "run the same command again", root=tmp_path)
    part = tmp_path / "released" / "daa-f30k-sgr.pth.tar.part"
    assert part.read_bytes() == ckpt[:half]
    assert not (tmp_path / "released" / "daa-f30k-sgr").exists()
    before = srv.served
    code, out, _ = run(["daa-f30k-sgr", "--mirror", srv.url] + paths(tmp_path), capsys)
    assert code == 0
    assert srv.served - before == len(ckpt) - half  # only the rest
    assert srv.ranges == ["bytes=%d-" % half]
    assert (tmp_path / "released" / "daa-f30k-sgr" / "SGR.pth.tar").read_bytes() == ckpt
    assert not leftovers(tmp_path)


def test_a_broken_connection_is_continued_in_the_same_run(src, serve, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAITS", (0,))
    srv = serve({"vocab.zip": src["vocab.zip"]})
    srv.cut = 100
    code, _, _ = run(["scan-vocab", "--mirror", srv.url] + paths(tmp_path), capsys)
    assert code == 0 and srv.served == len(src["vocab.zip"])
    assert (tmp_path / "vocab" / "f30k_precomp_vocab.json").read_bytes() == \
        src["vocab"]["vocab/f30k_precomp_vocab.json"]


def corrupt_zip(entries):
    """A zip (stored, not deflated) with bytes flipped inside its first member: its CRC no
    longer matches."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    payload = buf.getvalue()
    b = bytearray(payload)
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        info = zf.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 10, start + 20):
        b[i] ^= 0xFF
    return bytes(b)


def unrecognised_checkpoint(tmp_path):
    path = tmp_path / "odd.pth.tar"
    torch.save({"epoch": 1, "model": [{"w": torch.zeros(2)}], "opt": None}, path)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["corrupt_zip", "truncated_ckpt", "unrecognised_ckpt",
                                  "wrong_matcher", "size", "sha256", "layout"])
def test_a_bad_download_is_refused_and_nothing_changes(case, src, serve, tmp_path, capsys,
                                                       monkeypatch):
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "mine.json").write_text("{}")  # the user's files, kept as they are
    (tmp_path / "released").mkdir()
    (tmp_path / "released" / "mine.pth.tar").write_bytes(b"x")
    name, payload, key, fragment = {
        "corrupt_zip": ("scan-data", corrupt_zip(src["data"]), "archive_invalid",
                        "CRC"),
        "truncated_ckpt": ("daa-f30k-sgr", src["SGR"][:len(src["SGR"]) // 2],
                           "ckpt_download_invalid", "not a usable checkpoint"),
        "unrecognised_ckpt": ("daa-f30k-sgr", unrecognised_checkpoint(tmp_path),
                              "ckpt_download_invalid", "not a checkpoint of an image-text"),
        "wrong_matcher": ("daa-f30k-sgr", src["SAF"], "ckpt_download_other", "SAF"),
        "size": ("scan-vocab", src["vocab.zip"], "download_size", "the table"),
        "sha256": ("scan-vocab", src["vocab.zip"], "download_sha256", "sha256"),
        "layout": ("scan-data", zip_bytes({"readme.txt": b"hello"}), "archive_layout",
                   "holds no"),
    }[case]
    it = releases.item(name)
    if case in ("size", "sha256"):
        fake = it._replace(size=len(payload) + 1) if case == "size" else \
            it._replace(sha256=hashlib.sha256(b"other").hexdigest())
        monkeypatch.setattr(releases, "ITEMS", [fake if x is it else x for x in releases.ITEMS])
    srv = serve({it.file: payload})
    (tmp_path / "odd.pth.tar").unlink(missing_ok=True)
    refused([name, "--mirror", srv.url] + paths(tmp_path), capsys, key, fragment,
            root=tmp_path)
    if case == "size":  # the server's size disagrees with the table: nothing fetched
        assert srv.served == 0
    assert not leftovers(tmp_path)  # the bad download is removed: the next run starts afresh
    assert sorted(os.listdir(tmp_path / "released")) == ["mine.pth.tar"]
    assert not (tmp_path / "data" / "f30k_precomp").exists()
    assert sorted(os.listdir(tmp_path / "vocab")) == ["mine.json"]


def test_a_full_disk(src, serve, tmp_path, capsys, monkeypatch):
    srv = serve({"data.zip": src["data.zip"]})
    usage = shutil.disk_usage(tmp_path)
    # no room: refused before a byte is fetched
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    refused(["scan-data", "--mirror", srv.url] + paths(tmp_path), capsys, "disk_space",
            "--data_path", root=tmp_path)
    assert srv.served == 0
    monkeypatch.undo()
    monkeypatch.setattr(download, "RETRY_WAITS", ())

    # the disk fills up while unpacking: nothing is installed, the existing files are kept
    (tmp_path / "data" / "coco_precomp").mkdir(parents=True)
    (tmp_path / "data" / "coco_precomp" / "notes.txt").write_text("mine")
    copy = shutil.copyfileobj
    calls = []

    def full(fsrc, fdst, length=0):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(fsrc, fdst, length)
    monkeypatch.setattr(shutil, "copyfileobj", full)
    refused(["scan-data", "--mirror", srv.url] + paths(tmp_path), capsys, "disk_full",
            "free some space", root=tmp_path)
    assert not (tmp_path / "data" / "f30k_precomp").exists()
    assert not [p for p in leftovers(tmp_path) if not p.endswith("data.zip.part")]
    # the complete download is kept: the next run unpacks it without fetching it again
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    served = srv.served
    code, _, _ = run(["scan-data", "--mirror", srv.url] + paths(tmp_path), capsys)
    assert code == 0 and srv.served == served
    assert (tmp_path / "data" / "coco_precomp" / "notes.txt").read_text() == "mine"


def test_server_down_and_404(src, serve, tmp_path, capsys):
    with socket.socket() as s:  # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = "http://127.0.0.1:%d" % port
    line = refused(["scan-data", "--mirror", url] + paths(tmp_path), capsys,
                   "download_unreachable", url + "/data.zip", "--from_file data.zip")
    assert line.startswith("scan-data: ")
    srv = serve({})
    refused(["daa-coco-saf", "--mirror", srv.url] + paths(tmp_path), capsys,
            "download_unreachable", "HTTP 404", "--from_file daa-coco-saf.pth.tar")
    assert srv.served == 0 and not leftovers(tmp_path)
    assert not (tmp_path / "released" / "daa-coco-saf").exists()


def test_existing_dataset_needs_overwrite(src, serve, tmp_path, capsys):
    ds = tmp_path / "data" / "f30k_precomp"
    ds.mkdir(parents=True)
    (ds / "test_caps.txt").write_text("my own captions\n")
    srv = serve({"data.zip": src["data.zip"], "vocab.zip": src["vocab.zip"]})
    refused(["scan-data", "--mirror", srv.url] + paths(tmp_path), capsys, "file_exists",
            str(ds), "--overwrite", root=tmp_path)
    assert srv.served == 0
    # a vocabulary that differs from the zip's is refused too (after the small fetch)
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "f30k_precomp_vocab.json").write_text("{}")
    refused(["scan-vocab", "--mirror", srv.url] + paths(tmp_path), capsys, "file_exists",
            "f30k_precomp_vocab.json", root=tmp_path)
    code, _, _ = run(["scan-data", "scan-vocab", "--overwrite", "--mirror", srv.url] +
                     paths(tmp_path), capsys)
    assert code == 0
    assert (ds / "test_caps.txt").read_bytes() == src["data"]["data/f30k_precomp/test_caps.txt"]
    assert not leftovers(tmp_path)


def test_an_identical_file_is_in_place_already(src, serve, tmp_path, capsys):
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "f30k_precomp_vocab.json").write_bytes(
        src["vocab"]["vocab/f30k_precomp_vocab.json"])
    srv = serve({"vocab.zip": src["vocab.zip"]})
    before = snapshot(tmp_path)
    code, _, _ = run(["scan-vocab", "--mirror", srv.url] + paths(tmp_path), capsys)
    assert code == 0
    assert_unchanged(before, tmp_path, new_allowed=False)


def test_from_file_installs_with_the_same_checks(src, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "vocab.zip").write_bytes(src["vocab.zip"])
    (mine / "model.pth.tar").write_bytes(src["SAF"])
    (mine / "broken.pth.tar").write_bytes(src["SAF"][:1000])
    code, _, _ = run(["scan-vocab", "--from_file", str(mine / "vocab.zip")] + paths(tmp_path),
                     capsys)
    assert code == 0
    code, _, _ = run(["daa-f30k-saf", "--from_file", str(mine / "model.pth.tar")] +
                     paths(tmp_path), capsys)
    assert code == 0
    assert (tmp_path / "released" / "daa-f30k-saf" / "SAF.pth.tar").read_bytes() == src["SAF"]
    assert (tmp_path / "vocab" / "f30k_precomp_vocab.json").is_file()
    # the user's files are theirs: kept, even when refused
    refused(["daa-coco-saf", "--from_file", str(mine / "broken.pth.tar")] + paths(tmp_path),
            capsys, "ckpt_download_invalid", "broken.pth.tar", root=tmp_path)
    refused(["daa-f30k-sgr", "--from_file", str(mine / "model.pth.tar")] + paths(tmp_path),
            capsys, "ckpt_download_other", "holds no SGR", root=tmp_path)
    assert sorted(os.listdir(mine)) == ["broken.pth.tar", "model.pth.tar", "vocab.zip"]
    # an installed checkpoint is replaced only with --overwrite
    (mine / "sgr.pth.tar").write_bytes(src["SGR"])
    refused(["daa-f30k-saf", "--from_file", str(mine / "model.pth.tar")] + paths(tmp_path),
            capsys, "file_exists", "daa-f30k-saf", root=tmp_path)
    code, _, _ = run(["daa-f30k-saf", "--overwrite", "--from_file", str(mine / "model.pth.tar")]
                     + paths(tmp_path), capsys)
    assert code == 0
    assert os.listdir(tmp_path / "released" / "daa-f30k-saf") == ["SAF.pth.tar"]
    refused(["daa-f30k-sgr", "--from_file", str(mine / "nope.pth.tar")] + paths(tmp_path),
            capsys, "from_file_missing")
    refused(["daa-f30k-sgr", "daa-f30k-saf", "--from_file", str(mine / "model.pth.tar")] +
            paths(tmp_path), capsys, "from_file_names")
    assert not leftovers(tmp_path)


def test_the_command_line(tmp_path):
    """The script itself (one process: it imports torch): a mistake is one line, exit 2."""
    out = subprocess.run([sys.executable, "download.py", "scan-dta", "--data_path",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: scan-dta: no such item (did you mean scan-data?); " \
        "pass a name that python download.py --list shows"
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- Google Drive

def test_gdown_is_called_with_the_drive_id(src, tmp_path, capsys, monkeypatch):
    """The Drive path up to the call that would reach Google: gdown.download and
    gdown.download_folder are replaced by fakes that record their arguments and write what
    Google would have sent."""
    import gdown
    calls = []

    def fake_file(**kw):
        calls.append(kw)
        Path(kw["output"]).write_bytes(src["SGR"])
        return kw["output"]

    def fake_folder(**kw):
        calls.append(kw)
        os.makedirs(kw["output"], exist_ok=True)
        Path(kw["output"], "model_best.pth").write_bytes(src["SGR"])
        return [os.path.join(kw["output"], "model_best.pth")]
    monkeypatch.setattr(gdown, "download", fake_file)
    monkeypatch.setattr(gdown, "download_folder", fake_folder)
    code, _, _ = run(["daa-f30k-sgr"] + paths(tmp_path), capsys)
    assert code == 0
    assert calls[0]["id"] == "1Q0Ttw4yViWnupJA1whTAYGYHr-O56D4L" and calls[0]["resume"]
    assert os.path.dirname(calls[0]["output"]) == str(tmp_path / "released")
    assert (tmp_path / "released" / "daa-f30k-sgr" / "SGR.pth.tar").read_bytes() == src["SGR"]
    assert not leftovers(tmp_path)
    # a folder (HREM's): gdown.download_folder; an SGR model in it is not HREM's
    refused(["hrem-f30k"] + paths(tmp_path), capsys, "ckpt_download_other", "holds no HREM",
            "found: SGR")
    assert calls[1]["id"] == "1sIWjmtTNGMs8HBQhM48QR9u0twOv_rB6" and calls[1]["resume"]

    def unreachable(**kw):
        raise gdown.exceptions.FileURLRetrievalError("Failed to retrieve file url.\n\n more")
    monkeypatch.setattr(gdown, "download", unreachable)
    refused(["naaf-f30k"] + paths(tmp_path), capsys, "download_unreachable",
            "1NpZZYXmmejgd_nam79IdETSYIuRjo-7p", "Failed to retrieve file url",
            "--from_file naaf-f30k.pth.tar", root=tmp_path)
    monkeypatch.setitem(sys.modules, "gdown", None)
    refused(["naaf-f30k"] + paths(tmp_path), capsys, "gdown_missing", "pip install gdown",
            root=tmp_path)


# ----------------------------------------------------------------------------- mistakes

def test_mistakes(src, serve, tmp_path, capsys):
    refused(["sgraf-f3k"] + paths(tmp_path), capsys, "item_unknown", "did you mean sgraf-f30k")
    code, _, err = run([], capsys)
    assert code == 2 and err.key == "arguments"
    # another download.py writes the same partial file
    srv = serve({"vocab.zip": src["vocab.zip"]})
    (tmp_path / "vocab").mkdir()
    with open(tmp_path / "vocab" / "vocab.zip.part", "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        refused(["scan-vocab", "--mirror", srv.url] + paths(tmp_path), capsys,
                "download_busy", root=tmp_path)
    assert srv.served == 0


def test_a_directory_that_cannot_be_written(src, serve, tmp_path, capsys, monkeypatch):
    srv = serve({"vocab.zip": src["vocab.zip"]})

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(os, "makedirs", denied)
    refused(["scan-vocab", "--mirror", srv.url] + paths(tmp_path), capsys, "output_unwritable",
            "--vocab_path", "Permission denied", root=tmp_path)
    assert srv.served == 0


# ----------------------------------------------------------------------------- --check

@pytest.fixture
def layout(src, tmp_path):
    for name, payload in list(src["data"].items()) + list(src["vocab"].items()):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    (tmp_path / "released" / "sgraf-f30k").mkdir(parents=True)
    (tmp_path / "released" / "sgraf-f30k" / "SGR.pth.tar").write_bytes(src["SGR"])
    return tmp_path


def check(tmp_path, capsys):
    return run(["--check"] + paths(tmp_path), capsys)


def test_check_a_complete_layout(layout, capsys):
    code, out, _ = check(layout, capsys)
    assert code == 0
    assert "test     test_ims.npy features (%d, 36, 32), %d captions" % (N_TEST, 5 * N_TEST) \
        in out
    assert "vocabulary %s" % (layout / "vocab" / "f30k_precomp_vocab.json") in out
    assert "sgraf-f30k SGR: ready" in out
    assert "sgraf-f30k SAF: missing %s; python download.py sgraf-f30k\n" % (
        layout / "released" / "sgraf-f30k" / "SAF.pth.tar") in out
    assert "daa-coco-sgr COCO 1K: missing %s, %s, %s; python download.py daa-coco-sgr " \
        "scan-data scan-vocab\n" % (layout / "released" / "daa-coco-sgr" / "SGR.pth.tar",
                                    layout / "data" / "coco_precomp" /
                                    "testall_ims.npy and testall_caps.txt",
                                    layout / "vocab" / "coco_precomp_vocab.json") in out


def test_check_with_gsmn_extras(layout, capsys):
    ds = layout / "data" / "f30k_precomp"
    np.save(ds / "test_ims_bbx.npy", np.ones((N_TEST, 36, 4), np.float32))
    code, out, _ = check(layout, capsys)
    assert code == 0 and "GSMN extras: ims_bbx.npy" in out
    np.save(ds / "test_ims_bbx.npy", np.ones((N_TEST - 1, 36, 4), np.float32))
    code, out, err = check(layout, capsys)
    assert code == 2 and err.key == "data_check"
    assert "test_ims_bbx.npy" in out


@pytest.mark.parametrize("case,expected", [
    ("no_split", "split_missing"), ("count", "caption_count"), ("no_vocab", "vocab_missing")])
def test_check_names_each_problem_in_one_line(case, expected, layout, capsys):
    ds = layout / "data" / "f30k_precomp"
    if case == "no_split":
        (ds / "test_caps.txt").unlink()
    elif case == "count":
        lines = (ds / "test_caps.txt").read_bytes().splitlines(keepends=True)
        (ds / "test_caps.txt").write_bytes(b"".join(lines[:-3]))
    else:
        (layout / "vocab" / "f30k_precomp_vocab.json").unlink()
    before = snapshot(layout)
    code, out, err = check(layout, capsys)
    assert code == 2 and err.key == "data_check" and "1 problem(s)" in str(err)
    assert_unchanged(before, layout, new_allowed=False)
    problem = [line for line in out.splitlines() if "problem:" in line]
    assert len(problem) == 1
    message = problem[0].split("problem: ", 1)[1]
    assert message.count("; ") >= 1 and len("error: " + message) <= ERROR_LINE_LIMIT
    named = str(ds) if case != "no_vocab" else str(layout / "vocab")
    head, cut, tail = message.split(": ", 1)[0].partition("\u2026")  # shortened in the middle
    assert (head.startswith(named) or named.startswith(head)) if cut else \
        head.startswith(named), message
    fix = {"split_missing": "download or regenerate the split",
           "caption_count": "captions", "vocab_missing": "pass --vocab_path DIR"}[expected]
    assert fix in message
    assert message == errors.message(expected, message.split(": ", 1)[0],
                                     **_fields(expected, ds, layout)), message
    if case == "no_split":
        assert "sgraf-f30k SGR: missing %s; python download.py scan-data\n" % (
            ds / "test_ims.npy and test_caps.txt") in out


def _fields(key, ds, layout):
    """The fields evaluation.py's own checks put in each message (the same check, not a
    copy: the message is identical)."""
    if key == "split_missing":
        found = sorted(n for n in os.listdir(ds) if not n.startswith("."))  # as ls shows them
        return dict(missing="test_caps.txt", found=", ".join(found[:6]) +
                    (" ..." if len(found) > 6 else ""),
                    expected="test_ims.npy (or test.h5) and test_caps.txt")
    if key == "caption_count":
        return dict(n_caps=5 * N_TEST - 3, n_images=N_TEST, n_five=5 * N_TEST,
                    features="test_ims.npy")
    return dict(name="f30k_precomp_vocab.json", data_name="f30k_precomp")
