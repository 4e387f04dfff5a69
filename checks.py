"""The `python checks.py` command: check feature files, print the troubleshooting table, convert
a checkpoint of the original python2.7 branch.

    python checks.py --features data/f30k_precomp/train_ims.npy   # every image finite, shape
    python checks.py --table > TROUBLESHOOTING.md                  # every error line (errors.py)
    python checks.py --convert-py2 OLD.pth.tar NEW.pth.tar         # python2.7-branch checkpoint

The checks themselves live beside what they guard: the error lines and the flag checks in
errors.py, the data's in data.py, the vocabulary's in vocab.py, the checkpoints' in
checkpoint.py, a training run's directory in runs.py.

One rule for every file a command writes (section "what a command writes"): never over a file
or a run that the command did not make unless the user asked (`--overwrite`), the shipped
vocabularies never by default (`check_output_file`, `runs.check_run`); what the project made is
recorded in a marker in its directory (`mark_made`, `made_record`); files are written through
a partial file renamed at the end, and a killed run's partial files are removed by the next
write there (`atomic_output`).
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys

import torch

import checkpoint
import data
import errors
# for "what a command writes" below
from errors import check_not_dir, error, file_in_the_way as _file_in_the_way
from vocab import PARTIAL, partial_path


# ------------------------------------------------------------------------ what a command writes
#
# One rule for every file a command writes (checkpoints, logs, similarity matrices,
# vocabularies, h5 files, plots, caches, demo data and runs): never over a file or a run that it
# did not make unless the user asked (--overwrite), and the vocabularies shipped in vocab/ are
# never rewritten by default. What this project made is recorded in a marker file, MARKER, in
# the directory that holds it: a directory's own record (e.g. demo.py's run directory, the log
# directory of train.py's run) and one per file (valid while the file keeps the size and
# modification time recorded, so a file the user replaced afterwards is theirs). Every file is
# written to a temporary `.<name>~<host>~<pid>.partial` beside it and renamed at the end
# (`atomic_output`); the partial files of killed runs are removed by the next write there.

MARKER = ".made_by.json"
# sha256 -> the files shipped in vocab/ (the originals' vocabularies)
SHIPPED = {
    "ece46633bedb157d3430716d2fe8c90d2631895c97eb5eebfc5c1c3e04ebca44":
        "vocab/f30k_precomp_vocab.json",
    "91b208d4673b076bdb3fc8a1441eb4b55cadc6f5be0137d89672f4abd21c9541":
        "vocab/coco_precomp_vocab.json",
    "aa5b83eb7a89b579052ee94b870cc68ea24c37eaf728c07626bc08edd50cd3e7":
        "vocab/naaf/f30k_precomp.json",
    "a855f2ae6f67cac6e7d6b235e93e9c74e2aa2060543c61ad39908218e6b8433a":
        "vocab/naaf/coco_precomp.json",
}


def _read_marker(directory):
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def made_record(path):
    """What a command of this project recorded when it made `path` (a directory, or a file
    still as it was written): a dict with `made_by` (e.g. "np2h.py") and what the maker
    stored with it; None for anything else."""
    if os.path.isdir(path):
        record = _read_marker(path).get("dir")
        return record if isinstance(record, dict) else None
    if not os.path.isfile(path):
        return None
    directory, name = os.path.split(os.path.abspath(path))
    record = _read_marker(directory).get("files", {}).get(name)
    st = os.stat(path)
    if isinstance(record, dict) and record.get("size") == st.st_size and \
            record.get("mtime_ns") == st.st_mtime_ns:
        return record
    return None


def mark_made(path, made_by, **info):
    """Record that the command `made_by` made `path` (a directory, or a file it has just
    written), with `info` (json values) for it to recognise the file later."""
    path = os.path.abspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    marker = _read_marker(directory)
    record = dict(info, made_by=made_by)
    if directory == path:
        marker["dir"] = record
    else:
        st = os.stat(path)
        record.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
        files[os.path.basename(path)] = record
        marker["files"] = files
    text = json.dumps(marker, indent=1, sort_keys=True) + "\n"
    with atomic_output(os.path.join(directory, MARKER)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def shipped_file(path):
    """The shipped file that `path` is a copy of (by content), or None."""
    names = {os.path.basename(v) for v in SHIPPED.values()}
    if os.path.basename(path) not in names or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return SHIPPED.get(hashlib.sha256(f.read()).hexdigest())


def check_output_file(path, where=None, made_by=None, overwrite=False,
                      alternative="another path", expected="a file name"):
    """The rule, checked before the compute, for a file that a command will write: `path` is
    not a directory and no file is in the way of its directory; an existing file is refused
    unless `overwrite`, or unless `made_by` made it (its record is returned: the caller may
    reuse it, resume it or replace it). A shipped vocabulary gets its own message.
    `alternative` completes the fix ("pass --overwrite to replace it, or ...")."""
    where = where or path
    check_not_dir(path, where, expected=expected)
    blocked = _file_in_the_way(os.path.dirname(path))
    if blocked:
        raise error("path_not_dir", where, found=blocked,
                    expected="a path whose directories are directories")
    if not os.path.lexists(path):
        return None
    record = made_record(path)
    if overwrite or (made_by is not None and record and record.get("made_by") == made_by):
        return record
    shipped = shipped_file(path)
    if shipped:
        raise error("file_shipped", where, what="file %s" % shipped, alternative=alternative)
    detail = " (written by %s)" % record["made_by"] if record else ""
    raise error("file_exists", where, detail=detail, alternative=alternative)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_partials(directory):
    """Remove the partial files that killed runs on this machine left in `directory`
    (`.<name>~<host>~<pid>.partial` of a process that is gone)."""
    host = socket.gethostname()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".") and name.endswith(PARTIAL)):
            continue
        parts = name[1:-len(PARTIAL)].rsplit("~", 2)
        if len(parts) == 3 and parts[1] == host and parts[2].isdigit() and \
                not _alive(int(parts[2])):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


@contextlib.contextmanager
def atomic_output(path):
    """Write `path` through a temporary path beside it (the block writes the file there):
    renamed to `path`, fsynced, when the block ends, removed when it raises. A killed process
    leaves its partial file, which the next atomic_output in that directory removes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_partials(directory)
    tmp = partial_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save to a partial file in the target's directory, fsynced, then renamed over the
    target (atomic_output): a crash never leaves a half-written file behind."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


# ----------------------------------------------------------------------------- outputs

# The record beside an output file: "<output>.record"
RECORD_SUFFIX = ".record"


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's contents: what identifies a checkpoint or a data file in a record
    (a copy or a move keeps it; a retrained or regenerated file changes it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _short(value):
    text = value if isinstance(value, str) else json.dumps(value)
    if re.fullmatch(r"[0-9a-f]{64}", text):  # a digest: its first 12 digits are enough
        text = text[:12]
    return text if len(text) <= 40 else text[:37] + "..."


def identity_change(ours, theirs):
    """The first entry in which two identities (dicts) differ, as `name X here, Y in its
    record`, or None when they are equal."""
    for key in list(ours) + [k for k in theirs if k not in ours]:
        if ours.get(key) != theirs.get(key):
            return "%s %s here, %s in its record" % (key, _short(ours.get(key, "none")),
                                                      _short(theirs.get(key, "none")))
    return None


class OutputRecord:
    """The record that this project's tools keep beside an output file they write, as
    `<output>.record`: JSON lines, the first saying what the output is made of (`identity`: the
    contents of the inputs and the options that determine it, plus `info` for the reader),
    each later one an entry appended when a part of the output is finished (flushed and
    fsynced, after the output's part itself). It is what makes an output "ours": a rerun of
    the same command may continue or reuse it, anything else is refused (`claim_output`).
    While a run writes, it holds an exclusive lock on the record."""

    def __init__(self, path, file, header, entries):
        self.path, self.record_path = path, path + RECORD_SUFFIX
        self._file, self.header, self.entries = file, header, entries

    @property
    def identity(self):
        return self.header["identity"]

    def append(self, entry):
        """Add one entry (a JSON-serialisable dict), durably."""
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries.append(entry)

    def close(self):
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None


def read_record(record_path):
    """(header, entries) of a record file, or None when it is not one. A last line cut short
    by a crash is ignored."""
    try:
        with open(record_path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    parsed = []
    for line in lines[:-1]:  # the part after the last newline is an unfinished line
        try:
            parsed.append(json.loads(line))
        except ValueError:
            break
    if not parsed or not isinstance(parsed[0], dict) or "identity" not in parsed[0]:
        return None
    return parsed[0], [e for e in parsed[1:] if isinstance(e, dict)]


def check_output_path(path, flag):
    """The directory of an output exists and the path is not a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise error("output_dir", directory, flag=flag)
    if os.path.isdir(path):
        raise error("output_not_ours", path, why="it is a directory", flag=flag)


def claim_output(path, identity, flag, overwrite=False, info=None):
    """Take `path` as this run's output, before any compute, or refuse it with a one-line
    error, writing nothing:
      - `path` does not exist, or `overwrite`: a fresh record (its header written);
      - `path` exists with a record of the same `identity`: the record, with the entries of
        the earlier run, so the caller continues (or reuses) what it finished;
      - `path` exists with no record beside it (a file of the user's, or of a tool that keeps
        none): `output_not_ours`; with a record of another identity: `output_other_run`;
        with a record another process holds: `output_busy`.
    Returns an OutputRecord, locked until closed. `flag` names the option in the messages
    (e.g. `--save_sims`). Retrieval caches and figures use it as `--save_sims` does."""
    check_output_path(path, flag)
    rec = path + RECORD_SUFFIX
    exists = os.path.exists(path)
    if exists and not overwrite and not os.path.isfile(rec):
        raise error("output_not_ours", path, flag=flag,
                    why="no %s beside it" % os.path.basename(rec))
    f = open(rec, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error("output_busy", path, flag=flag) from None
        except OSError:  # a file system without locks: go on unlocked
            pass
        old = read_record(rec) if exists and not overwrite else None
        if exists and not overwrite:
            if old is None:
                raise error("output_not_ours", path, flag=flag,
                            why="%s is not a record" % os.path.basename(rec))
            change = identity_change(identity, old[0]["identity"])
            if change is not None:
                raise error("output_other_run", path, flag=flag, change=change)
            f.seek(0)
            text = f.read()
            if not text.endswith("\n"):  # drop a line that a crash cut short
                f.truncate(text.rfind("\n") + 1)
            return OutputRecord(path, f, old[0], old[1])
        # a fresh record; a record left without its output (deleted) describes nothing, but
        # a file of that name that is not a record is the user's
        if not exists and not overwrite and os.path.getsize(rec) and read_record(rec) is None:
            raise error("output_not_ours", rec, flag=flag, why="it is not a record")
        header = {"record": 1, "output": os.path.basename(path), "identity": identity,
                  "info": info or {}}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(header, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
        return OutputRecord(path, f, header, [])
    except BaseException:
        f.close()
        if os.path.exists(rec) and os.path.getsize(rec) == 0:
            os.remove(rec)  # made by the open above: leave nothing behind
        raise


# ----------------------------------------------------------------------------- the command

def build_parser():
    p = errors.ArgumentParser(prog="checks.py", description="SGRAF input checks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--table", action="store_true", help="print TROUBLESHOOTING.md")
    g.add_argument("--features", nargs="+", metavar="FILE",
                   help="check every image of feature files (.npy or .h5) for NaN/Inf, and "
                        "count the images with an all-zero region")
    g.add_argument("--convert-py2", nargs=2, metavar=("OLD", "NEW"),
                   help="re-save a checkpoint of the original python2.7 branch")
    p.add_argument("--img_dim", type=int, default=None, help="expected feature dimension")
    p.add_argument("--overwrite", action="store_true",
                   help="--convert-py2: replace NEW if it exists")
    return p


@errors.exit_on_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    errors.check_positive(args, ["img_dim"])
    if args.table:
        sys.stdout.write(errors.render_table())
    elif args.features:
        for path in args.features:
            errors.check_not_dir(path, path,
                                 expected="a feature file ({split}_ims.npy or {split}.h5)")
            if not os.path.isfile(path):
                raise errors.error("features_missing", path)
            images = data.open_features(path)
            data.check_features(images, path, args.img_dim, sample=0)
            bad, n_zero, first_zero = data.scan_features(images)
            if bad is not None:
                raise errors.error("features_nonfinite", path, index=bad,
                                   checked="all %d images checked" % len(images))
            print("%s: %s images of shape %s, all finite" % (path, len(images),
                                                             tuple(images.shape[1:])))
            if n_zero:
                print("warning: " + errors.message(
                    "features_zero_region", path, index=first_zero[0], region=first_zero[1],
                    checked="the first of %d such images" % n_zero))
    else:
        checkpoint.convert_py2_checkpoint(*args.convert_py2, overwrite=args.overwrite)
        print("wrote %s" % args.convert_py2[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
