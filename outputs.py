"""What a command writes: the one rule, the one writer, the one record, the file digests.

The rule: a command never writes over a file or a directory that it did not make unless the
user asked (`--overwrite`), and never over the vocabularies shipped in vocab/ by default. It is
checked before any compute (`check_output_file`; `check_outputs` for the figures and the
retrieval cache, which their command replaces freely when it made them; `claim_output` for a
`--save_sims` matrix, which a rerun continues).

The record: what this project made is recorded in one file, MARKER (`.made_by.json`), in the
directory that holds it: the directory's own record (demo.py's run directory, train.py's log
directory, a retrieval cache entry) and one record per file (checkpoints, vocabularies, .h5
files, synthetic data, figures, the cache's digests), valid while the file keeps the size and
modification time recorded, so that a file the user put there afterwards is theirs. Each record
is `made_by` (the command) and what that command keeps to recognise its file (e.g. what an .h5
was converted from). `made_record(path)` is the one question "did this project make it?". A file
written in place as it is computed (`--save_sims`) cannot keep a size and time; its record is
`<file>.record` beside it (`OutputRecord`: what it is made of, then the parts finished, for a
rerun to continue), and made_record reads that for it.

The writer: `atomic_output` for every file and directory: written to a partial
`.<name>~<host>~<pid>.partial` beside the target, fsynced, renamed over it at the end, and
recorded (under a lock on the directory, so that the record and the file never disagree); the
partial of a killed process is removed by the next write in that directory.

The run lock: `lock_dir` holds a directory for one process's run (train.py's --model_name and
--logger_name), with a POSIX record lock that dies with the process and that no forked child
(a DataLoader worker) inherits; a second run there is refused (`run_busy`). Before any compute,
`check_writable` and `check_space` refuse an output that a read-only or full disk could not
take; an OS failure while writing (`os_failure`: ENOSPC, EROFS, EACCES) is one line,
`write_failed`, naming the file and what was kept, and leaves no partial file.

The digests: `file_digest`, sha256 of a file's bytes (records, the --save_sims identity, the
retrieval cache's keys); `crc32` (`Summed` while a file is written, `file_crc32` when it is read
back), what a file read back carries to show it is as written: a fast checksum against damage,
not forgery.

The locks (a record being written, a directory's marker) die with the process that took them:
a child forked while one is held (a DataLoader worker) drops its copy of the descriptor at once
(`_drop_locks_in_child`), so that it cannot keep the lock alive after its parent is killed.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import socket
import zlib

import errors

MARKER = ".made_by.json"
# a file or directory being written: `.<name>~<host>~<pid>.partial` beside its target
PARTIAL = ".partial"
# the record beside a file written in place (--save_sims): "<output>.record"
RECORD_SUFFIX = ".record"
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


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's contents: what identifies a checkpoint or a data file in a record
    (a copy or a move keeps it; a retrained or regenerated file changes it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_crc32(path):
    """(size, crc32) of a file's bytes, read through a memory map (no copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return size, zlib.crc32(m)


class Summed:
    """A binary file being written, whose size and crc32 are kept as it is written."""

    def __init__(self, f):
        self._f, self.size, self.crc32 = f, 0, 0

    def write(self, data):
        view = memoryview(data).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        self.size += len(view)
        return self._f.write(view)

    def flush(self):
        self._f.flush()

    @property
    def sums(self):
        return {"size": self.size, "crc32": self.crc32}


# ----------------------------------------------------------------------------- the locks

_HELD = set()  # the descriptors of the locks this process holds


def _drop_locks_in_child():
    # a forked child shares the parent's open file descriptions, and with them its flock
    # locks: point its copies at /dev/null, so that a lock dies with the process that took it
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.dup2(null, fd, inheritable=False)
    os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def lock(fd, exclusive=True, blocking=True):
    """flock `fd`, held until `unlock(fd)` (which closes nothing) or the descriptor is closed;
    never by a forked child. BlockingIOError when `blocking` is False and another process
    holds it; a file system without locks goes on unlocked."""
    flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, flags if blocking else flags | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:
        return
    _HELD.add(fd)


def unlock(fd):
    """Forget the lock on `fd` (the caller closes it, which releases it)."""
    _HELD.discard(fd)


# ----------------------------------------------------------------------------- the record

@contextlib.contextmanager
def _locked(directory, exclusive):
    """A lock on `directory` (flock on the directory itself) while its marker is read or
    written: a writer replaces a file and records it in one step for every reader."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        lock(fd, exclusive)
        yield
    finally:
        unlock(fd)
        os.close(fd)  # releases the lock


def _read_marker(directory):
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _write_marker(directory, marker):
    """Replace the marker (its directory locked by the caller)."""
    path = os.path.join(directory, MARKER)
    tmp = partial_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def _record_file(directory, name, record):
    """Add the record of the file `name` of `directory`, as it is now (its directory locked
    by the caller)."""
    st = os.stat(os.path.join(directory, name))
    marker = _read_marker(directory)
    files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    files[name] = dict(record, size=st.st_size, mtime_ns=st.st_mtime_ns)
    marker["files"] = files
    _write_marker(directory, marker)


def _progress_record(path):
    """The made_record of a file written in place: the header of `<path>.record`."""
    found = read_record(path + RECORD_SUFFIX)
    if found is None or found[0].get("output") != os.path.basename(path):
        return None
    info = found[0].get("info")
    return dict(info if isinstance(info, dict) else {}, made_by=found[0].get("made_by"),
                identity=found[0]["identity"])


def made_record(path):
    """What a command of this project recorded when it made `path` (a directory, or a file
    still as it was written): a dict with `made_by` (e.g. "np2h.py") and what the maker
    stored with it; None for anything else."""
    if os.path.isdir(path):
        with _locked(path, exclusive=False):
            record = _read_marker(path).get("dir")
        return record if isinstance(record, dict) else None
    if not os.path.isfile(path):
        return None
    directory, name = os.path.split(os.path.abspath(path))
    with _locked(directory, exclusive=False):
        record = _read_marker(directory).get("files", {}).get(name)
        st = os.stat(path)
    if isinstance(record, dict) and record.get("size") == st.st_size and \
            record.get("mtime_ns") == st.st_mtime_ns:
        return record
    return _progress_record(path)


def made_by(path):
    """The command of this project that made `path` (made_record), or None."""
    return (made_record(path) or {}).get("made_by")


def mark_made(path, made_by, **info):
    """Record that the command `made_by` made `path` (a directory, or a file it has just
    written), with `info` (json values) for it to recognise the file later. A file written
    through atomic_output is recorded by it (its `made_by`)."""
    path = os.path.abspath(path)
    record = dict(info, made_by=made_by)
    if os.path.isdir(path):
        with _locked(path, exclusive=True):
            marker = _read_marker(path)
            marker["dir"] = record
            _write_marker(path, marker)
        return
    directory, name = os.path.split(path)
    with _locked(directory, exclusive=True):
        _record_file(directory, name, record)


# ----------------------------------------------------------------------------- the rule

def shipped_file(path):
    """The shipped file that `path` is a copy of (by content), or None."""
    names = {os.path.basename(v) for v in SHIPPED.values()}
    if os.path.basename(path) not in names or not os.path.isfile(path):
        return None
    return SHIPPED.get(file_digest(path))


def check_output_file(path, where=None, made_by=None, overwrite=False,
                      alternative="another path", expected="a file name"):
    """The rule, checked before the compute, for a file that a command will write: `path` is
    not a directory and no file is in the way of its directory; an existing file is refused
    unless `overwrite`, or unless `made_by` made it (its record is returned: the caller may
    reuse it, resume it or replace it). A shipped vocabulary gets its own message.
    `alternative` completes the fix ("pass --overwrite to replace it, or ...")."""
    where = where or path
    errors.check_not_dir(path, where, expected=expected)
    blocked = errors.file_in_the_way(os.path.dirname(path))
    if blocked:
        raise errors.error("path_not_dir", where, found=blocked,
                           expected="a path whose directories are directories")
    if not os.path.lexists(path):
        return None
    record = made_record(path)
    if overwrite or (made_by is not None and record and record.get("made_by") == made_by):
        return record
    shipped = shipped_file(path)
    if shipped:
        raise errors.error("file_shipped", where, what="file %s" % shipped,
                           alternative=alternative)
    detail = " (written by %s)" % record["made_by"] if record else ""
    raise errors.error("file_exists", where, detail=detail, alternative=alternative)


def check_outputs(paths, tool, flag):
    """The rule for what a command replaces whenever it made it (figures, the retrieval
    cache): refuse (one-line UsageError) when one of `paths` exists and was not made by `tool`,
    or cannot be written (a parent is a file, or a directory that is not writable)."""
    for path in paths:
        if os.path.isdir(path) or (os.path.lexists(path) and made_by(path) != tool):
            raise errors.error("file_not_made", path, tool=tool, flag=flag)
        check_writable(path)


def _existing(path):
    """`path`, or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def unwritable(path):
    """Why `path` (a file or a directory to write, existing or not) cannot be written, or
    None: the question asked before any compute. (os.access answers for root as well on a
    read-only file system.)"""
    target = _existing(path)
    if target != os.path.abspath(path):  # it will be made in target
        if not os.path.isdir(target):
            return "%s is not a directory" % target
        writable = os.access(target, os.W_OK | os.X_OK)
    else:
        writable = os.access(target, os.W_OK | (os.X_OK if os.path.isdir(target) else 0))
    if writable:
        return None
    try:
        read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "%s is %s" % (target, "on a read-only file system" if read_only else
                         "not writable")


def check_space(path, need, what, flag, where=None):
    """Refuse (disk_space), before any compute, an output of `need` bytes that the disk
    where `path` goes cannot hold."""
    free = shutil.disk_usage(_existing(os.path.dirname(os.path.abspath(path)))).free
    if free < need:
        raise errors.error("disk_space", where or "%s %s" % (flag, path), need=human(need), what=what,
                           free=human(free), flag=flag)


def human(n):
    """A number of bytes as a line shows it: `12.3 MB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return "%d B" % n if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1024


def check_writable(path, where=None):
    """Refuse (output_unwritable), before any compute, an output that cannot be written."""
    reason = unwritable(path)
    if reason:
        raise errors.error("output_unwritable", where or path, reason=reason)


# ----------------------------------------------------------------------------- one run per directory

LOCK = ".lock"


class DirLock:
    """An exclusive lock on a directory for as long as a run writes there (`lock_dir`): a
    POSIX record lock (fcntl.lockf) on `<dir>/.lock`, which holds the owner's pid. Such a lock
    belongs to the process that took it: it dies with it (a SIGKILL included), and a child
    (fork: a DataLoader worker, a subprocess) never holds it, unlike flock, whose lock every
    forked child keeps alive. The file is removed by `release`; a killed run's is unlocked,
    and taken by the next run."""

    def __init__(self, directory, fd, made):
        self.directory, self.path, self._fd, self._made = directory, os.path.join(
            directory, LOCK), fd, made

    def keep(self):
        """The run has started in its directory: release() leaves it, even empty."""
        self._made = []

    def release(self):
        """Unlock, remove the lock file, and the directories that lock_dir made if they were
        left empty and not kept (a run refused before it started leaves nothing behind)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            # removed while locked: a run that opened it meanwhile finds it gone (lock_dir)
            os.remove(self.path)
        os.close(self._fd)  # releases the lock
        self._fd = None
        for d in self._made:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break


def lock_dir(directory, where, flag):
    """Take `directory` (made if missing) for this process's run, or refuse it: `run_busy`
    when another running process holds it, `output_unwritable` when it cannot be written.
    Returns a DirLock (release() it; the process's exit releases it anyway). A file system
    without record locks (some network ones) runs unlocked."""
    directory = os.path.abspath(directory)
    made, d = [], directory
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    path = os.path.join(directory, LOCK)
    try:
        os.makedirs(directory, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                held = e.errno in (errno.EAGAIN, errno.EACCES)
                pid = _lock_owner(fd) if held else None
                os.close(fd)
                if held:
                    raise errors.error("run_busy", where, pid=pid or "unknown",
                                       flag=flag) from None
                fd = None  # no record locks here: go on unlocked
                break
            try:  # the file may have been removed by its last owner while we waited
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if fd is not None:
            with contextlib.suppress(OSError):  # only for the message of a refused run
                os.ftruncate(fd, 0)
                os.write(fd, b"%d\n" % os.getpid())
    except OSError as e:
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise errors.error("output_unwritable", where, reason=errors.write_failure(e) or
                           errors.first_line(e)) from None
    return DirLock(directory, fd, made)


def _lock_owner(fd):
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


# ----------------------------------------------------------------------------- the writer

def partial_path(path):
    """The partial file (or directory) through which `path` is written by this process."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, ".%s~%s~%d%s" % (name, socket.gethostname(), os.getpid(),
                                                    PARTIAL))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def clean_partials(directory):
    """Remove the partial files and directories that killed runs on this machine left in
    `directory` (`.<name>~<host>~<pid>.partial` of a process that is gone)."""
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
                _remove(os.path.join(directory, name))
            except OSError:
                pass


def _fsync_tree(path):
    """fsync a file, or every file of a directory and the directory."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            _fsync_tree(os.path.join(path, name))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, made_by=None, **info):
    """Write `path` through a partial path beside it: the block writes a file there, or makes
    a directory there and fills it. When the block ends the partial is fsynced and renamed to
    `path` (a directory never over a full one: OSError when another process made it meanwhile)
    and, with `made_by`, recorded as that command's with `info` (mark_made) as it is then: the
    block may fill in what it computed while writing (a dict of checksums); when it raises,
    the partial is removed. A killed process leaves its partial, which the next atomic_output
    in that directory removes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_partials(directory)
    tmp = partial_path(path)
    try:
        yield tmp
        is_dir = os.path.isdir(tmp)
        if is_dir and made_by is not None:  # a directory carries its record inside it
            _write_marker(tmp, {"dir": dict(info, made_by=made_by)})
        _fsync_tree(tmp)
        if is_dir:
            os.rename(tmp, path)  # never over a directory (OSError when one is there)
        elif made_by is None:
            os.replace(tmp, path)
        else:
            with _locked(directory, exclusive=True):
                os.replace(tmp, path)
                _record_file(directory, os.path.basename(path), dict(info, made_by=made_by))
    except BaseException as e:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                _remove(tmp)
        reason = os_failure(e)
        if reason is None:
            raise
        raise write_failed(path, reason) from None


def os_failure(exc):
    """The reason (errors.write_failure) of the OS failure behind `exc`: the exception itself
    or one it was raised from (torch.save reports a full disk as a RuntimeError of its zip
    writer, raised while handling the OSError); None when it is none of those."""
    for _ in range(4):
        if exc is None:
            return None
        reason = errors.write_failure(exc)
        if reason:
            return reason
        exc = exc.__cause__ or exc.__context__
    return None


def write_failed(path, reason, kept=None, fix=None):
    """The one-line error of a file that the OS refused to write (`reason`: os_failure):
    what was kept (by default: the earlier file, when there is one, or nothing) and what
    to do."""
    if kept is None:
        kept = ("the earlier %s is intact" % os.path.basename(path) if os.path.isfile(path)
                else "nothing was written")
    if fix is None:
        fix = ("free some space, then run the same command again" if "space" in reason or
               "quota" in reason else
               "make the directory writable (or write elsewhere), then run the same command "
               "again")
    return errors.error("write_failed", path, reason=reason, kept=kept, fix=fix)


def atomic_save(obj, path, made_by=None, **info):
    """torch.save through atomic_output: a crash never leaves a half-written file behind."""
    import torch  # the one writer that needs it: the other commands never load torch for it
    with atomic_output(path, made_by, **info) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


# ----------------------------------------------------------------------------- written in place

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
    """The record of a file written in place (`--save_sims`), as `<output>.record` beside it:
    JSON lines, the first saying which command makes it and what it is made of (`identity`: the
    contents of the inputs and the options that determine it, plus `info` for the reader),
    each later one an entry appended when a part of the output is finished (flushed and
    fsynced, after the output's part itself). It is what makes such an output "ours"
    (made_record): a rerun of the same command may continue or reuse it, anything else is
    refused (`claim_output`). While a run writes, it holds an exclusive lock on the record."""

    def __init__(self, path, file, header, entries):
        self.path, self.record_path = path, path + RECORD_SUFFIX
        self._file, self.header, self.entries = file, header, entries

    @property
    def identity(self):
        return self.header["identity"]

    def append(self, entry):
        """Add one entry (a JSON-serialisable dict), durably."""
        self._file.write((json.dumps(entry, separators=(",", ":")) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries.append(entry)

    def close(self):
        if self._file is not None:
            unlock(self._file.fileno())
            self._file.close()  # releases the lock
            self._file = None


def read_record(record_path):
    """(header, entries) of a record file, or None when it is not one (its header is not a
    dict with an `identity` dict). A last line cut short by a crash is ignored; an entry line
    that is not JSON (damaged) is None among the entries, for the reader to count."""
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
            parsed.append(None)
    if not parsed or not isinstance(parsed[0], dict) or \
            not isinstance(parsed[0].get("identity"), dict):
        return None
    return parsed[0], parsed[1:]


def check_output_path(path, flag):
    """The directory of an output exists and the path is not a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise errors.error("output_dir", directory, flag=flag)
    if os.path.isdir(path):
        raise errors.error("output_not_ours", path, why="it is a directory", flag=flag)
    check_writable(path + RECORD_SUFFIX if os.path.exists(path) else path)
    if os.path.exists(path):
        check_writable(path)


def claim_output(path, identity, flag, made_by=None, overwrite=False, info=None):
    """Take `path` as this run's output, written in place by the command `made_by`, before
    any compute, or refuse it with a one-line error, writing nothing:
      - `path` does not exist, or `overwrite`: a fresh record (its header written);
      - `path` exists with a record of the same `identity`: the record, with the entries of
        the earlier run, so the caller continues (or reuses) what it finished;
      - `path` exists with no record beside it (a file of the user's, or of a tool that keeps
        none): `output_not_ours`; with a record of another identity: `output_other_run`;
        with a record another process holds: `output_busy`.
    Returns an OutputRecord, locked until closed. `flag` names the option in the messages
    (e.g. `--save_sims`)."""
    check_output_path(path, flag)
    rec = path + RECORD_SUFFIX
    exists = os.path.exists(path)
    if exists and not overwrite and not os.path.isfile(rec):
        raise errors.error("output_not_ours", path, flag=flag,
                           why="no %s beside it" % os.path.basename(rec))
    f = open(rec, "a+b")  # bytes: a damaged line need not be UTF-8
    try:
        try:
            lock(f.fileno(), blocking=False)
        except BlockingIOError:
            raise errors.error("output_busy", path, flag=flag) from None
        old = read_record(rec) if exists and not overwrite else None
        if exists and not overwrite:
            if old is None:
                raise errors.error("output_not_ours", path, flag=flag,
                                   why="%s is not a record" % os.path.basename(rec))
            change = identity_change(identity, old[0]["identity"])
            if change is not None:
                raise errors.error("output_other_run", path, flag=flag, change=change)
            f.seek(0)
            text = f.read()
            if not text.endswith(b"\n"):  # drop a line that a crash cut short
                f.truncate(text.rfind(b"\n") + 1)
            return OutputRecord(path, f, old[0], old[1])
        # a fresh record; a record left without its output (deleted) describes nothing, but
        # a file of that name that is not a record is the user's
        if not exists and not overwrite and os.path.getsize(rec) and read_record(rec) is None:
            raise errors.error("output_not_ours", rec, flag=flag, why="it is not a record")
        header = {"record": 1, "output": os.path.basename(path), "made_by": made_by,
                  "identity": identity, "info": info or {}}
        f.seek(0)
        f.truncate()
        f.write((json.dumps(header, separators=(",", ":")) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
        return OutputRecord(path, f, header, [])
    except BaseException:
        unlock(f.fileno())
        f.close()
        if os.path.exists(rec) and os.path.getsize(rec) == 0:
            os.remove(rec)  # made by the open above: leave nothing behind
        raise
