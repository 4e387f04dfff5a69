"""The first hour: fetch SCAN's precomputed data and vocabularies and the authors' released
checkpoints by name, resumable and verified, and check a data folder.

    python download.py --list                       # every item, its source and numbers
    python download.py scan-data scan-vocab sgraf-f30k [--data_path data] [--vocab_path vocab]
                       [--dest runs/released]       # fetch, verify, put in place
    python download.py --check [--data_path data] [--vocab_path vocab]   # what is missing

The items (`releases.ITEMS`) copy each source URL and published number from the five original
READMEs (SGRAF, DAA, NAAF, GSMN, HREM). Plain URLs are fetched over HTTP with Range requests, a
partial file `<file>.part` beside the target that the same command continues; Google Drive files
and folders go through `gdown` (its own resumable partial files). `--mirror URL` fetches every item
as `URL/<file>` over HTTP; `--from_file FILE` installs a file fetched another way.

Nothing is installed before it is verified: a zip's CRCs (read once, while it is unpacked into a
staging directory beside the target), a checkpoint's load (`weights_only=True`) and its
recognition by the registry, the size and sha256 where the table or the server states them. Then
the files are renamed into place; a file already there is never replaced unless it is identical
(skipped) or `--overwrite` is given (the project's one output rule, outputs.check_output_file).
Free space is checked before a byte is fetched (what is left to fetch, plus as much again for
unpacking, as these zips hold incompressible float32 features) and again, exactly, before a zip
is unpacked.

Layout it writes: a zip's members under --data_path / --vocab_path (its top directory `data/` or
`vocab/` dropped); a checkpoint item as `<dest>/<name>/<MODULE>.pth.tar` for each matcher it
holds (an archive's other files, e.g. logs, kept beside); GSMN's extras as
`<data_path>/<dataset>/{split}_ims_bbx.npy`... beside the splits. `--check` runs the checks that
evaluation.py makes (checks.py, data.py, gsmn.py's loaders), not copies of them.
"""
import errno
import fcntl
import logging
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from http.client import HTTPException

from tqdm import tqdm

import checkpoint
import data
import errors
import matchers
import outputs
import releases
import vocab

log = logging.getLogger(__name__)

# a read or connect that waits longer than this is a dead connection
TIMEOUT = 60
# after a broken connection: wait this long (seconds) and continue, once per entry
RETRY_WAITS = (2, 10, 30)
CHUNK = 1 << 20
# kept free beyond what the download and its unpacking need
MARGIN = 256 << 20
SPLITS = ("train", "dev", "test", "testall")
# GSMN's optional files beside a split (gsmn.py): boxes, image sizes, word ids, dependency arcs
EXTRAS = re.compile(r"^(train|dev|test|testall)_(ims_bbx\.npy|ims_size\.npy|precaps_stan\.txt|"
                    r"caps\.json)$")

# problems of the fetched bytes themselves: the download is removed
BAD_DOWNLOAD = {"download_size", "download_sha256", "archive_invalid", "archive_layout",
                "ckpt_download_invalid", "ckpt_download_other"}

def drive_id(url):
    """('file' or 'folder', id) of a Google Drive link, or None."""
    m = re.search(r"drive\.google\.com/(?:file/d/|drive/(?:u/\d+/)?folders/)([\w-]+)", url)
    if not m:
        return None
    return ("folder" if "/folders/" in url else "file"), m.group(1)



# ----------------------------------------------------------------------------- space

def _existing_dir(path):
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def check_space(directory, need, what, flag):
    """`need` bytes (plus MARGIN) are free where `directory` is (or will be)."""
    free = shutil.disk_usage(_existing_dir(directory)).free
    if free < need + MARGIN:
        raise errors.error("disk_space", "%s %s" % (flag, directory),
                           need=releases.human(need + MARGIN), what=what,
                           free=releases.human(free), flag=flag)


def _disk_full(e, what, where, resume):
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.error("disk_full", where, what=what, reason=errors.first_line(e),
                            resume=resume)
    return None


# ----------------------------------------------------------------------------- fetching

class _Broken(Exception):
    """The connection broke during the body: the partial file is kept for the next try."""


def _open(url, start=0, method="GET"):
    req = urllib.request.Request(url, method=method,
                                 headers={"Range": "bytes=%d-" % start} if start else {})
    return urllib.request.urlopen(req, timeout=TIMEOUT)


def _unreachable(it, url, reason, flag):
    alt = {"data": " (or from %s)" % releases.SCAN_KAGGLE, "vocab": ""}.get(it.kind, "")
    return errors.error("download_unreachable", it.name, url=url, reason=reason, alt=alt,
                        file=it.file)


def remote_size(it, url, flag):
    """The size the server states (HEAD), or None; an unreachable source is an error here,
    before any byte is fetched."""
    try:
        with _open(url, method="HEAD") as r:
            n = r.headers.get("Content-Length")
            return int(n) if n and n.isdigit() else None
    except urllib.error.HTTPError as e:
        if e.code in (405, 501):  # no HEAD: the GET will say
            return None
        raise _unreachable(it, url, "HTTP %d %s" % (e.code, e.reason), flag) from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _unreachable(it, url, errors.first_line(reason), flag) from None


def http_fetch(it, url, part, flag, unpack_factor):
    """Fetch `url` into `part`, continuing what is there: Range requests, a retry after each
    broken connection (RETRY_WAITS), a progress bar. Returns the size."""
    expected = it.size
    total = remote_size(it, url, flag)
    if expected and total and total != expected:
        raise errors.error("download_size", it.name, what=url, got=total, source="the table",
                           expected=expected, fix="the source changed: fetch it yourself and "
                           "pass --from_file %s (with the same checks)" % it.file)
    total = expected or total
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if total is not None and have > total:  # not this file's beginning
        os.remove(part)
        have = 0
    if total is not None:  # before a byte is fetched
        check_space(os.path.dirname(part), (total - have) * (1 + unpack_factor),
                    "%s to fetch%s" % (releases.human(total - have),
                                       " and to unpack" if unpack_factor else ""), flag)
    waits = list(RETRY_WAITS)
    with open(part, "ab") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.error("download_busy", part) from None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=it.name,
                   disable=None)
        try:
            while total is None or have < total:
                try:
                    have, total = _fetch_once(it, url, f, have, total, bar, flag)
                    if total is None:
                        total = have
                except _Broken as e:
                    have = os.fstat(f.fileno()).st_size  # what arrived is kept
                    if not waits:
                        raise errors.error("download_interrupted", it.name, url=url,
                                           have=releases.human(have),
                                           total=releases.human(total) if total else "?",
                                           reason=str(e), part=part) from None
                    time.sleep(waits.pop(0))
        finally:
            bar.close()
    return have


def _fetch_once(it, url, f, have, total, bar, flag):
    """One GET from byte `have`: appends to `f`; (have, total) after it. Raises _Broken when
    the connection breaks (what arrived is kept)."""
    try:
        r = _open(url, start=have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and total is not None and have == total:
            return have, total
        if e.code == 416:  # the partial file is not this file's beginning: start again
            f.truncate(0)
            return 0, total
        raise _unreachable(it, url, "HTTP %d %s" % (e.code, e.reason), flag) from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        raise _Broken(errors.first_line(getattr(e, "reason", e))) from None
    with r:
        if have and r.status != 206:  # the server ignores Range: start again from 0
            log.warning("%s: the server does not resume (HTTP %d): fetching from the start",
                        url, r.status)
            f.truncate(0)
            have = 0
            bar.reset(total=total)
        length = r.headers.get("Content-Length")
        if total is None and length and length.isdigit():
            total = have + int(length)
            bar.total = total
        try:
            while True:
                chunk = r.read(CHUNK)
                if not chunk:
                    break
                try:
                    f.write(chunk)
                    f.flush()
                except OSError as e:
                    full = _disk_full(e, "the download of %s" % it.name, f.name,
                                      " (it continues from what is written)")
                    raise (full or e) from None
                have += len(chunk)
                bar.update(len(chunk))
        except (OSError, HTTPException) as e:
            if isinstance(e, errors.SGRAFError):
                raise
            raise _Broken(errors.first_line(e)) from None
    if total is not None and have < total:
        raise _Broken("the server stopped sending")
    if total is not None and have > total:  # more than the server announced: start afresh
        f.truncate(0)
        raise errors.error("download_size", it.name, what=url, got=have,
                           source="the server", expected=total, fix=_refetch(it, True))
    return have, total


def gdown_fetch(it, target, flag):
    """A Google Drive file (to `target`) or folder (into the directory `target`) through gdown,
    resumable with its own partial files. Returns the path fetched."""
    try:
        import gdown
    except ImportError:
        raise errors.error("gdown_missing", it.name, file=it.file) from None
    kind, ident = drive_id(it.url)
    try:
        if kind == "folder":
            got = gdown.download_folder(id=ident, output=target, quiet=False, resume=True,
                                        retries=len(RETRY_WAITS))
        else:
            got = gdown.download(id=ident, output=target, quiet=False, resume=True,
                                 retries=len(RETRY_WAITS))
    except OSError as e:
        full = _disk_full(e, "the download of %s" % it.name, target,
                          " (gdown continues from its partial file)")
        if full:
            raise full from None
        raise _unreachable(it, it.url, errors.first_line(e), flag) from None
    except Exception as e:  # gdown's FileURLRetrievalError, DownloadError, ...
        raise _unreachable(it, it.url, errors.first_line(e), flag) from None
    if not got or not os.path.exists(target):
        raise _unreachable(it, it.url, "gdown fetched nothing", flag)
    return target


def fetch(it, directory, mirror, from_file, flag):
    """The item's file, fetched or given: (path, ours). `ours`: a file this command fetched
    (removed once installed or found bad), not the user's --from_file."""
    if from_file:
        if not os.path.exists(from_file):
            raise errors.error("from_file_missing", "--from_file %s" % from_file)
        return from_file, False
    os.makedirs(directory, exist_ok=True)
    if mirror:
        url = mirror.rstrip("/") + "/" + it.file
    else:
        url = it.url
    if drive_id(url):
        target = os.path.join(directory, ".%s.gdown" % it.file)
        return gdown_fetch(it, target, flag), True
    part = os.path.join(directory, it.file + ".part")
    http_fetch(it, url, part, flag, unpack_factor=1 if it.kind != "checkpoint" else 0)
    return part, True


# ----------------------------------------------------------------------------- verifying

def _discard(path, ours):
    if ours and os.path.isfile(path):
        os.remove(path)
    elif ours and os.path.isdir(path):
        shutil.rmtree(path)


def _refetch(it, ours):
    return ("the download was removed: run again, or fetch it yourself and pass --from_file "
            "%s" % it.file) if ours else "fetch it again"


def verify_file(it, path, ours):
    """The size and sha256 the table states, when it states them."""
    if os.path.isdir(path):
        return
    size = os.path.getsize(path)
    if it.size and size != it.size:
        raise errors.error("download_size", it.name, what=path, got=size, source="the table",
                           expected=it.size, fix=_refetch(it, ours))
    if it.sha256:
        got = outputs.file_digest(path)
        if got != it.sha256:
            raise errors.error("download_sha256", it.name, what=path, got=got[:12],
                               expected=it.sha256[:12], fix=_refetch(it, ours))


def is_torch_zip(zf):
    """torch.save writes a zip too: `<archive>/data.pkl` and `<archive>/version`."""
    names = zf.namelist()
    return any(n.endswith("/data.pkl") for n in names) and \
        any(n.endswith("/version") or n.endswith("/.format_version") for n in names)


def kind_of(path):
    """'dir', 'zip', 'tar' or 'checkpoint' (anything else: torch.load will say)."""
    if os.path.isdir(path):
        return "dir"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return "checkpoint" if is_torch_zip(zf) else "zip"
        except (zipfile.BadZipFile, OSError):  # members() says what is wrong with it
            return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    return "checkpoint"


def _safe_name(name):
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        return None
    return "/".join(parts)


def members(it, path):
    """[(name inside the archive, size, crc or None)] of a zip or tar; a bad archive (or one
    whose names leave its directory) is a one-line error."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                out = [(i.filename, i.file_size, i.CRC) for i in zf.infolist() if not i.is_dir()]
        else:
            with tarfile.open(path) as tf:
                out = [(m.name, m.size, None) for m in tf.getmembers() if m.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise errors.error("archive_invalid", it.name, what=os.path.basename(path),
                           reason=errors.first_line(e), fix=_refetch(it, True)) from None
    bad = [n for n, _, _ in out if _safe_name(n) is None]
    if bad:
        raise errors.error("archive_invalid", it.name, what=os.path.basename(path),
                           reason="member %s leaves the archive's directory" % bad[0],
                           fix="use the authors' file")
    return [(_safe_name(n), s, c) for n, s, c in out]


def _name(info):
    return info.filename if isinstance(info, zipfile.ZipInfo) else info.name


def extract(it, path, chosen, staging, ours):
    """Unpack the archive members `chosen` ({name: relative target}) under `staging`; every
    byte is read once, and a zip's CRC is checked as it is read."""
    opener = zipfile.ZipFile if zipfile.is_zipfile(path) else tarfile.open
    try:
        with opener(path) as arc:
            infos = arc.infolist() if isinstance(arc, zipfile.ZipFile) else arc.getmembers()
            todo = [i for i in infos if _safe_name(_name(i)) in chosen]
            total = sum(i.file_size if isinstance(i, zipfile.ZipInfo) else i.size
                        for i in todo)
            with tqdm(total=total, unit="B", unit_scale=True, desc="unpack " + it.name,
                      disable=None) as bar:
                for info in todo:
                    name = _safe_name(_name(info))
                    dst = os.path.join(staging, chosen[name])
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    src = arc.open(info) if isinstance(arc, zipfile.ZipFile) else \
                        arc.extractfile(info)
                    with src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    bar.update(os.path.getsize(dst))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # writing: the disk, not the archive
            raise
        raise errors.error("archive_invalid", it.name, what=os.path.basename(path),
                           reason=errors.first_line(e), fix=_refetch(it, ours)) from None


def load_verified(it, path, shown, ours):
    """The matcher name of a checkpoint file: loaded with weights_only=True (checkpoint.py)
    and recognised by the registry; else a one-line error."""
    try:
        ckpt = checkpoint.load_checkpoint(path)
        return matchers.recognise(ckpt, path)
    except errors.CheckpointError as e:
        fields = getattr(e, "fields", None)
        reason = errors.PROBLEMS[e.key].problem.format(where=e.where, **fields) \
            if fields is not None and e.key in errors.PROBLEMS else str(e)
        raise errors.error("ckpt_download_invalid", it.name, what=shown, reason=reason,
                           fix=_refetch(it, ours)) from None


# ----------------------------------------------------------------------------- installing

def same_file(path, size, crc):
    """`path` holds exactly these bytes (size, then the zip's CRC-32): already in place."""
    if not os.path.isfile(path) or os.path.getsize(path) != size or crc is None:
        return False
    value = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            value = zlib.crc32(block, value)
    return value == crc


def place(plan, staging, overwrite, what):
    """Rename the staged files into place ({relative: target}); an existing target is moved
    aside first and removed only when every file is in (put back if a rename fails)."""
    moved, aside = [], []
    try:
        for rel, target in plan.items():
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            if os.path.lexists(target):
                old = target + ".replaced"
                os.replace(target, old)
                aside.append((old, target))
            os.replace(os.path.join(staging, rel), target)
            moved.append(target)
    except OSError as e:
        for target in moved:
            if os.path.exists(target):
                os.remove(target)
        for old, target in aside:
            os.replace(old, target)
        full = _disk_full(e, what, staging, "")
        raise (full or e) from None
    for old, _ in aside:
        os.remove(old)


def _staging(directory, name):
    path = os.path.join(directory, ".%s.staging" % name)
    if os.path.isdir(path):  # a killed run's: it holds nothing installed
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def install_archive(it, path, ours, root, overwrite, flag):
    """scan-data, scan-vocab, gsmn-extras: the members go under `root`."""
    mem = members(it, path)
    chosen = {}
    if it.kind == "extras":
        for name, size, crc in mem:
            parts = name.split("/")
            ds = [p for p in parts[:-1] if p.endswith("_precomp")]
            if ds and EXTRAS.match(parts[-1]):
                chosen[name] = (os.path.join(ds[-1], parts[-1]), size, crc)
        expected = "<dataset>_precomp/{split}_ims_bbx.npy, _ims_size.npy, _precaps_stan.txt " \
                   "or _caps.json"
    else:
        top = {n.split("/")[0] for n, _, _ in mem}
        # data.zip holds data/<dataset>/..., vocab.zip vocab/...: the top directory goes
        strip = it.kind if top == {it.kind} else None
        for name, size, crc in mem:
            rel = name.split("/", 1)[1] if strip else name
            if rel:
                chosen[name] = (rel, size, crc)
        expected = "data/<dataset>/{split}_ims.npy and {split}_caps.txt" if it.kind == "data" \
            else "vocab/<dataset>_vocab.json"
        if it.kind == "data" and not any(r.endswith("_caps.txt") for r, _, _ in chosen.values()):
            chosen = {}
        if it.kind == "vocab" and not any(r.endswith(".json") for r, _, _ in chosen.values()):
            chosen = {}
    if not chosen:
        raise errors.error("archive_layout", it.name, what=os.path.basename(path),
                           expected=expected, fix=_refetch(it, ours))
    # the one output rule: an identical file is in place already; another is refused
    todo = {}
    for name, (rel, size, crc) in chosen.items():
        target = os.path.join(root, rel)
        if same_file(target, size, crc):
            continue
        outputs.check_output_file(target, overwrite=overwrite,
                                  alternative="move it away (nothing was installed)")
        todo[name] = rel
    if not todo:
        log.info("%s: every file is in place already under %s", it.name, root)
        return []
    check_space(root, sum(chosen[n][1] for n in todo), "to unpack %s" % it.name, flag)
    staging = _staging(root, it.name)
    try:
        try:
            extract(it, path, {n: rel for n, rel in todo.items()}, staging, ours)
        except OSError as e:
            full = _disk_full(e, "the unpacked %s" % it.name, root, "")
            raise (full or e) from None
        plan = {rel: os.path.join(root, rel) for rel in todo.values()}
        place(plan, staging, overwrite, "the unpacked %s" % it.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(plan.values())


def install_checkpoint(it, path, ours, dest, overwrite, flag):
    """A checkpoint file, an archive of them, or a Drive folder: each model the item holds is
    verified and installed as <dest>/<name>/<MODULE>.pth.tar, the rest beside it."""
    final = os.path.join(dest, it.name)
    kind = kind_of(path)
    if kind in ("zip", "tar"):
        need = sum(size for _, size, _ in members(it, path))
    else:  # a download is moved into place; the user's file is copied
        need = 0 if ours else _size(path)
    check_space(dest, need, "to install %s" % it.name, flag)
    staging = _staging(dest, it.name)
    try:
        if kind == "checkpoint":
            local = os.path.join(staging, os.path.basename(it.file))
            try:
                if ours:  # the download itself: no second copy of it
                    os.replace(path, local)
                else:  # the user's file stays where it is
                    shutil.copyfile(path, local)
            except OSError as e:
                raise (_disk_full(e, it.name, dest, "") or e) from None
        else:
            if kind == "dir":
                try:
                    if ours:  # gdown's folder: moved, not copied
                        os.rmdir(staging)
                        os.replace(path, staging)
                    else:
                        shutil.copytree(path, staging, dirs_exist_ok=True)
                except OSError as e:
                    raise (_disk_full(e, it.name, dest, "") or e) from None
            else:
                mem = members(it, path)
                try:
                    extract(it, path, {n: n for n, _, _ in mem}, staging, ours)
                except OSError as e:
                    raise (_disk_full(e, it.name, dest, "") or e) from None
        found = {}
        for rootdir, _, names in os.walk(staging):
            for n in sorted(names):
                p = os.path.join(rootdir, n)
                if kind == "checkpoint" or re.search(r"\.(pth|pt|ckpt|tar)$", n):
                    shown = os.path.relpath(p, staging) if kind != "checkpoint" else \
                        os.path.basename(path)
                    module = load_verified(it, p, shown, ours)
                    # the best model first, as train.py names it
                    found.setdefault(module, []).append(p)
        files = {}
        for module in it.modules:
            cands = sorted(found.get(module, []),
                           key=lambda p: (not os.path.basename(p).startswith("model_best"), p))
            if not cands:
                raise errors.error("ckpt_download_other", it.name, expected=module,
                                   found=", ".join(sorted(found)) or "no checkpoint",
                                   fix=_refetch(it, ours))
            files[module] = cands[0]
        for module, p in files.items():
            os.replace(p, os.path.join(staging, "%s.pth.tar" % module))
        old = None
        if os.path.lexists(final):  # --overwrite: the old one goes once the new one is in
            old = final + ".replaced"
            os.replace(final, old)
        try:
            os.replace(staging, final)
        except OSError:
            if old:
                os.replace(old, final)
            raise
        if old:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [releases.ckpt_path(dest, it.name, m) for m in it.modules]


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)
    return os.path.getsize(path)


def get(it, args):
    """Fetch, verify and install one item; the paths installed."""
    flag = {"data": "--data_path", "vocab": "--vocab_path", "extras": "--data_path"}.get(
        it.kind, "--dest")
    root = {"data": args.data_path, "vocab": args.vocab_path, "extras": args.data_path}.get(
        it.kind, args.dest)
    errors.check_dir(root, "%s %s" % (flag, root), exists=False,
                     expected="a directory (it is made if missing)")
    if it.kind == "checkpoint" and os.path.lexists(os.path.join(root, it.name)) \
            and not args.overwrite:  # before a byte is fetched
        raise errors.error("file_exists", os.path.join(root, it.name), detail="",
                           alternative="move it away (python download.py --check shows what "
                                       "is installed)")
    if it.kind == "data" and not args.overwrite:  # an installed dataset: before a byte is fetched
        for ds in it.dataset.split(", "):
            loc = os.path.join(root, ds)
            if os.path.isdir(loc) and any(n.endswith(("_caps.txt", "_ims.npy"))
                                          for n in os.listdir(loc)):
                raise errors.error("file_exists", loc, detail=" and holds a dataset",
                                   alternative="move it away")
    try:
        path, ours = fetch(it, root, args.mirror, args.from_file, flag)
        try:
            verify_file(it, path, ours)
            if it.kind == "checkpoint":
                done = install_checkpoint(it, path, ours, root, args.overwrite, flag)
            else:
                done = install_archive(it, path, ours, root, args.overwrite, flag)
        except errors.SGRAFError as e:
            if e.key in BAD_DOWNLOAD:  # fetching it again is the fix: start afresh
                _discard(path, ours)
            raise
    except OSError as e:  # a directory that cannot be written (a full disk is said earlier)
        raise (_disk_full(e, it.name, root, "") or errors.error(
            "output_unwritable", "%s %s" % (flag, root), reason=errors.first_line(e))) from None
    _discard(path, ours)  # the zip is no longer needed: the unpacked files are in place
    return done


# ----------------------------------------------------------------------------- --check

def check_folder(data_path, vocab_path, dest, say=print):
    """Report what the data folder holds (datasets, splits, shapes, caption counts,
    vocabularies, GSMN extras) and what each command of --list still needs; returns the
    problems, each a one-line message of the checks evaluation.py makes."""
    import gsmn  # its loaders check the extras as it reads them
    problems = []
    ready = {}  # (dataset, split) -> (n_images, n_captions), for the commands below
    datasets = sorted(d for d in (os.listdir(data_path) if os.path.isdir(data_path) else [])
                      if os.path.isdir(os.path.join(data_path, d)) and any(
                          n.endswith(("_caps.txt", "_ims.npy", ".h5"))
                          for n in os.listdir(os.path.join(data_path, d))))
    if not datasets:
        say("%s: no dataset (python download.py scan-data)" % data_path)
    for ds in datasets:
        loc = os.path.join(data_path, ds)
        say("%s:" % loc)
        for split in SPLITS:
            feat, cap = data.feature_path(loc, split), os.path.join(loc, "%s_caps.txt" % split)
            if not (os.path.exists(feat) or os.path.exists(cap)):
                continue
            try:
                data.check_split_files(loc, split, feat, cap)
                images = data.open_features(feat)
                data.check_features(images, feat)
                captions = data.read_captions(cap)
                data.check_captions(captions, len(images), cap, feat)
                if split != "train":
                    data.check_eval_captions(len(images), len(captions), cap)
            except errors.SGRAFError as e:
                problems.append(str(e))
                say("  %s: problem: %s" % (split, e))
                continue
            ready[ds, split] = (len(images), len(captions))
            extras = []
            for name in sorted(os.listdir(loc)):
                m = EXTRAS.match(name)
                if not m or m.group(1) != split:
                    continue
                p = os.path.join(loc, name)
                try:
                    if name.endswith("_ims_bbx.npy"):
                        gsmn.load_boxes(p, len(images), images.shape[1])
                    elif name.endswith("_ims_size.npy"):
                        gsmn.load_sizes(p, len(images))
                    elif name.endswith("_caps.json"):
                        gsmn.load_depends(p, len(captions))
                    extras.append(name[len(split) + 1:])
                except errors.SGRAFError as e:
                    problems.append(str(e))
                    say("  %s: problem: %s" % (split, e))
            say("  %-8s %s features %s, %d captions%s" % (
                split, os.path.basename(feat), tuple(images.shape), len(captions),
                ("; GSMN extras: " + ", ".join(extras)) if extras else ""))
        vfile = os.path.join(vocab_path, "%s_vocab.json" % ds)
        try:
            words = vocab.load_vocab(vfile)
            say("  vocabulary %s: %d words" % (vfile, len(words)))
        except errors.SGRAFError as e:
            problems.append(str(e))
            say("  vocabulary: problem: %s" % e)
    say("The commands of python download.py --list:")
    for it in releases.ITEMS:
        for r in it.results:
            missing, items = _missing(it.dataset, r.command, ready, data_path, vocab_path,
                                      dest)
            say("  %s %s: %s" % (it.name, r.label, "ready" if not missing else
                                 "missing %s%s" % (", ".join(missing), "; python download.py "
                                                   + " ".join(items) if items else "")))
    return problems


def _missing(ds, command, ready, data_path, vocab_path, dest):
    """What a command of --list needs and does not find, and the items that get it."""
    argv = shlex.split(command)[2:]
    args = dict(zip(argv[::2], argv[1::2]))
    missing, items = [], []
    for flag in ("--model_path", "--model_path2"):
        if flag in args:
            rel = os.path.relpath(args[flag], releases.DEFAULT_DEST)
            p = os.path.join(dest, rel)
            if not os.path.isfile(p):
                missing.append(p)
                items.append(rel.split(os.sep)[0])
    split = args["--split"]
    if (ds, split) not in ready:
        missing.append(os.path.join(data_path, ds, "%s_ims.npy and %s_caps.txt" % (split, split)))
        items.append("scan-data")
    elif "--fold5" in argv and ready[ds, split][0] < 5000:
        missing.append("5000 images in %s for --fold5 (it has %d)" % (
            os.path.join(data_path, ds, split), ready[ds, split][0]))
    if "--vocab_path" in args and not os.path.isfile(
            os.path.join(vocab_path, "%s_vocab.json" % ds)):
        missing.append(os.path.join(vocab_path, "%s_vocab.json" % ds))
        items.append("scan-vocab")
    return missing, list(dict.fromkeys(items))


# ----------------------------------------------------------------------------- main

def build_parser():
    p = errors.ArgumentParser(prog="download.py", description="Fetch SCAN's data and "
                              "vocabularies and the authors' checkpoints by name, resumable "
                              "and verified; check a data folder")
    p.add_argument("names", nargs="*", metavar="NAME", help="items of --list")
    p.add_argument("--list", action="store_true", help="print every item and exit")
    p.add_argument("--check", action="store_true", help="check the data folder and say what "
                   "each command of --list still needs")
    p.add_argument("--data_path", default=releases.DEFAULT_DATA_PATH)
    p.add_argument("--vocab_path", default=releases.DEFAULT_VOCAB_PATH)
    p.add_argument("--dest", default=releases.DEFAULT_DEST,
                   help="where checkpoints go (<dest>/<name>/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files that differ from the download")
    p.add_argument("--from_file", default=None, metavar="FILE",
                   help="install FILE (fetched another way) as the one NAME, same checks")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="fetch every item as URL/<its file in --list>, over HTTP")
    return p


@errors.exit_on_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if args.list:
        print(releases.list_table())
        return 0
    if args.check:
        problems = check_folder(args.data_path, args.vocab_path, args.dest)
        if problems:
            raise errors.error("data_check", "--data_path %s" % args.data_path,
                               count=len(problems))
        return 0
    if not args.names:
        raise errors.error("arguments", "download.py", reason="name the items to fetch, or "
                           "pass --list or --check")
    its = [releases.item(n) for n in dict.fromkeys(args.names)]
    if args.from_file and len(its) != 1:
        raise errors.error("from_file_names", "--from_file %s" % args.from_file,
                           count=len(its))
    # a download is kept in its partial file (and gdown's), and what is installed stays
    errors.on_interrupt("what was fetched so far is kept (partial downloads included)",
                        "run the same command again: it continues from there")
    for it in its:
        for path in get(it, args):
            print("%s: %s" % (it.name, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
