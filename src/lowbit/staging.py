"""Output paths that never lose the user's data.

Every output (a folder or one file) is
- checked before any work: not the source model, not inside it, not containing it, not the current folder or
  one of its parents, an existing output only with overwrite (and only a folder that looks like a model output),
  a writable place; the check creates nothing;
- claimed for the whole run by a lock file beside it (`.NAME.lowbit-lock`, an flock the kernel drops when the
  process dies), so a second run writing the same output is refused at its start;
- built in a staging folder beside it (`.NAME.lowbit-tmp-PID`) and put in place only when complete. An existing
  output is swapped with the staging folder in one atomic step (Linux renameat2 RENAME_EXCHANGE), so there is no
  moment where OUT is missing or half-written; then the old one (renamed `.NAME.lowbit-old-PID`) is deleted.
  Where the filesystem cannot swap, OUT is first renamed to `.NAME.lowbit-old-PID`, then the staging folder to
  OUT: a crash between the two leaves no OUT but the old one intact under that name.

The next run that claims OUT finishes what a killed run left: staging folders are deleted (a run holding the
lock is the only one that can be writing), an old folder is renamed back to OUT when OUT is missing (else
deleted). A staging folder holding a resume checkpoint (`RESUME_DIR`, written by a run with --resume) is never
deleted: a run with resume adopts it (renames it to its own staging name) and continues it; a run without is
refused, with what to do. A resumable run stopped by an error, Ctrl-C or SIGTERM keeps its staging folder too;
the checkpoint is removed just before the folder is put in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

from .errors import LowbitError

STAGING, OLD, LOCK = ".lowbit-tmp-", ".lowbit-old-", ".lowbit-lock"
RESUME_DIR, RESUME_STATE = ".lowbit-resume", "state.json"  # a resumable run's checkpoint, inside its staging folder
# top-level files that mark a folder as a model or an export (what --overwrite may replace)
MODEL_MARKERS = ("config.json", "genai_config.json", "summary.json", "recipe.yaml")
_held: dict[Path, int] = {}  # outputs this process has claimed (claims nest: quantize claims its exports too)


def absolute(out) -> Path:
    """out with its parent resolved (symlinks followed) and its own name kept."""
    out = Path(out).expanduser()
    return out.absolute().parent.resolve() / out.name


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- checks (no side effects) ----------------------------------------------------------------------------
def check_output(out, overwrite: bool, sources=(), is_file: bool = False) -> None:
    """Refuse, before any work and without creating anything, an output that would lose data or cannot be
    written. sources: the model files or folders the run reads."""
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise LowbitError(f"output {out} names no new {'file' if is_file else 'folder'}; give a path such as "
                          f"{'out/model.gguf' if is_file else 'out/model-w4'}")
    target = absolute(out).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise LowbitError(f"output {out} is the current folder or contains it; give a new folder path")
    for source in sources:
        src = Path(source).expanduser().resolve()
        where = ("is" if target == src else "lies inside" if src in target.parents else
                 "contains" if target in src.parents else None)
        if where:
            raise LowbitError(f"output {out} {where} the source model {source}; write the output outside the model's "
                              f"folder")
    if is_file and out.is_dir():
        raise LowbitError(f"output {out} is a folder; give a file path")
    if not is_file and out.exists() and not out.is_dir():
        raise LowbitError(f"output {out} is a file; give a folder path")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise LowbitError(f"output {out} already exists; choose another path or pass --overwrite")
        if not is_file:
            _check_replaceable(out)
    _check_parent(absolute(out).parent, out)


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces a whole folder: only one that is empty or looks like a model output (flat, with a
    config.json, genai_config.json, summary.json, recipe.yaml or .onnx file at the top)."""
    entries = list(out.iterdir())
    folders = [p.name for p in entries if p.is_dir()]
    marked = any(p.name in MODEL_MARKERS or p.suffix == ".onnx" for p in entries)
    if entries and (folders or not marked):
        what = f"the subfolder {folders[0]}" if folders else f"files lowbit does not write ({entries[0].name}, ...)"
        raise LowbitError(f"--overwrite would replace the whole folder {out}, which holds {what}; remove it yourself "
                          f"or choose another output path")


def _check_parent(parent: Path, out: Path) -> None:
    """The nearest existing folder above the output is a folder this process can write into."""
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LowbitError(f"cannot write {out}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write to {existing}; choose a writable output path")


# -- the claim: lock and recovery ------------------------------------------------------------------------
def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LowbitError(f"cannot create the output's folder {out.parent} ({exc.strerror}); choose a writable "
                          f"path") from None


def _lock(out: Path, wait: bool):
    """An open file descriptor holding an exclusive flock on OUT's lock file, or None where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    path = out.with_name(f".{out.name}{LOCK}")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LowbitError(f"another lowbit run is writing {out} (it holds {path}); wait for it to finish or "
                              f"choose another output path") from None
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(out: Path, fd) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(out.with_name(f".{out.name}{LOCK}"))  # removed while locked: the next run locks a new file
    os.close(fd)


def _leftovers(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}{kind}"
    return [p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def resumable(tmp: Path) -> bool:
    """Whether a staging folder holds a resume checkpoint."""
    return (tmp / RESUME_DIR / RESUME_STATE).is_file()


def recover(out: Path, resume: bool = False) -> None:
    """Finish what a run that was killed while writing OUT left beside it (the caller holds OUT's lock); a
    resumable staging folder is kept for a run with resume and refused otherwise."""
    for old in _leftovers(out, OLD):
        if not out.exists() and not out.is_symlink():
            os.rename(old, out)
            _say(f"note: restored {out} from {old.name}, left by a run that was stopped while replacing it")
        else:
            _remove(old)
            _say(f"note: removed {old.name}, the replaced output a stopped run had not deleted yet")
    for tmp in _leftovers(out, STAGING):
        if resumable(tmp):
            if not resume:
                raise LowbitError(f"{tmp} holds an interrupted run of {out} that can be continued: rerun the same "
                                  f"command with --resume, or delete {tmp} to start over")
            continue
        _remove(tmp)
        _say(f"note: removed {tmp.name}, the unfinished output of a run that was stopped")


@contextlib.contextmanager
def claim(out, wait: bool = False, resume: bool = False):
    """Hold OUT for the duration (refusing when another run holds it, or waiting with wait=True), after
    finishing what a stopped run left (keeping a resumable staging folder with resume). Creates OUT's parent
    folders: call it after every check."""
    out = absolute(out)
    if out in _held:
        _held[out] += 1
        try:
            yield out
        finally:
            _held[out] -= 1
        return
    _make_parent(out)
    fd = _lock(out, wait)
    _held[out] = 1
    try:
        recover(out, resume)
        yield out
    finally:
        del _held[out]
        _unlock(out, fd)


# -- staging and the final swap --------------------------------------------------------------------------
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system cannot."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def put_in_place(tmp: Path, out: Path) -> None:
    """Move the complete staging path to OUT (module docstring: never a moment without a whole OUT)."""
    if tmp.is_file() or not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)  # a file replaces a file atomically; a folder takes a free name
        return
    old = out.with_name(f".{out.name}{OLD}{os.getpid()}")
    if exchange(tmp, out):
        os.rename(tmp, old)  # the staging name now holds the old output
    else:
        os.rename(out, old)
        os.rename(tmp, out)
    _remove(old)


@contextlib.contextmanager
def staged(out, overwrite: bool = False, sources=(), is_file: bool = False, resume: bool = False):
    """Yield a staging path beside OUT (a folder, or a file path with is_file) after checking and claiming OUT;
    on success it becomes OUT, on any failure (an error, Ctrl-C, SIGTERM, a full disk) it is deleted, unless
    resume is on and it holds a checkpoint. With resume, an interrupted run's resumable staging folder becomes
    this run's."""
    check_output(out, overwrite, sources, is_file)
    with claim(out, resume=resume) as target:
        tmp = target.with_name(f".{target.name}{STAGING}{os.getpid()}")
        if not (resume and resumable(tmp)):  # this process's own interrupted run is continued as it is
            _remove(tmp)
        try:
            if not is_file:
                if resume and not tmp.exists():
                    _adopt(target, tmp)
                tmp.mkdir(exist_ok=resume)
            yield tmp
        except BaseException:
            if resume and resumable(tmp):
                _say(f"note: kept {tmp}, the checkpoint of this run: rerun the same command with --resume to "
                     f"continue it")
            else:
                _remove(tmp)
            raise
        if resume:
            _remove(tmp / RESUME_DIR)
        put_in_place(tmp, target)


def _adopt(out: Path, tmp: Path) -> None:
    """Rename the newest resumable staging folder of OUT (left by an interrupted run) to `tmp`."""
    found = sorted((p for p in _leftovers(out, STAGING) if p != tmp and resumable(p)),
                   key=lambda p: (p / RESUME_DIR / RESUME_STATE).stat().st_mtime_ns)
    if found:
        os.rename(found[-1], tmp)
        for other in found[:-1]:
            _remove(other)
