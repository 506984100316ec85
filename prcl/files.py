"""Where the CLI meets the file system and the user: reads of regular files only, writes that never follow
a link, a lock per run folder, data fingerprints, one-line errors.

Imports nothing heavy, so that argument and file errors answer before torch loads.
"""
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# what a CLI reports as one line (no traceback): bad options, files and data; a diverged run; the OS
# refusing a read or a write (disk full, permission). PRCL_DEBUG=1 shows the traceback instead.
USER_ERRORS = (ValueError, FloatingPointError, OSError)


def fail(prog: str, err: Exception) -> int:
    """Print `prog: error: err` as one line and return exit status 1 (re-raise under PRCL_DEBUG=1)."""
    if os.environ.get("PRCL_DEBUG"):
        raise err
    message = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename is not None else err
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


@contextlib.contextmanager
def load_errors(name: str, path: "str | os.PathLike[str]") -> Iterator[None]:
    """A failure inside (a folder without a tokenizer, a damaged or foreign checkpoint, a model type prcl
    cannot use) as one ValueError line naming the argument and path: transformers, tokenizers, safetensors
    and json raise many types (a TypeError for a config.json holding a list), several over many lines; the
    type is in the message, PRCL_DEBUG=1 shows the traceback. Running out of memory keeps its type."""
    try:
        yield
    except Exception as e:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        # torch's OutOfMemoryError told by name: this module does not import torch
        if getattr(e, "errno", None) == errno.ENOMEM:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM), os.fspath(path)) from e
        if isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__) or (
                "out of memory" in text):
            raise
        raise ValueError(f"{name}: {os.fspath(path)}: cannot load ({type(e).__name__}): {text}") from e


# ---- reads -----------------------------------------------------------------------------------------------

def regular_file(path: str | os.PathLike[str], what: str) -> str | os.PathLike[str]:
    """path, once os.stat (which opens nothing) says it names a regular file (or a link to one); ValueError
    naming `what` when it is missing, a directory, or a FIFO, socket or device, which could block the
    read forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file {os.fspath(path)!r}") from None
    except OSError as e:
        raise ValueError(f"{what}: {os.fspath(path)!r}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what}: {os.fspath(path)!r} is a directory; expected a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what}: {os.fspath(path)!r} is not a regular file (a FIFO, socket or device); "
                         "pass a file")
    return path


def check_model_path(model: str, gguf_file: str | None = None, prog: str = "prcl", name: str = "model") -> None:
    """A local model directory or .gguf file; transformers would take a missing path for a hub name.
    name: the argument's name in the messages (model, teacher)."""
    if not model:
        raise ValueError(f"{name}: an empty path")
    if not os.path.exists(model):
        raise ValueError(f"{name}: no such file or directory {model!r} ({prog} loads local models only: a model "
                         "directory or a .gguf file)")
    if gguf_file:
        regular_file(os.path.join(model, gguf_file), "gguf_file")
    elif not os.path.isdir(model):
        regular_file(model, name)
    elif not any(os.path.lexists(os.path.join(model, f)) for f in ("config.json", "modules.json")):
        raise ValueError(f"{name}: {model!r} holds neither config.json nor modules.json: not a model directory")
    else:
        # a read of a FIFO would block: every file the loaders may open (sentence-transformers' module folders
        # one or two levels down), not hidden folders such as .git
        top = os.path.normpath(model).count(os.sep)
        for root, dirs, files in os.walk(os.path.normpath(model)):
            dirs[:] = [] if root.count(os.sep) - top >= 2 else [d for d in dirs if not d.startswith(".")]
            for f in files:
                if os.path.exists(os.path.join(root, f)):  # a dangling link: the loader names it if it needs it
                    regular_file(os.path.join(root, f), name)


def sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, str | int]]:
    """[{"path", "bytes", "sha256"}] of data files, to tell on resume whether they changed; ValueError for
    one that is not a regular file (hashing a FIFO would block)."""
    return [{"path": os.fspath(p), "bytes": os.path.getsize(regular_file(p, "data")), "sha256": sha256(p)}
            for p in paths]


# ---- writes ----------------------------------------------------------------------------------------------

def unsafe_under(out: str | os.PathLike[str]) -> list[tuple[str, bool]]:
    """(path, is_link) of every entry in the folder out that is a symbolic link (not followed) or a FIFO,
    socket or device (a read or an append would block on it), sorted."""
    found = []
    for root, dirs, files in os.walk(out):
        for n in dirs + files:
            try:
                mode = os.lstat(os.path.join(root, n)).st_mode
            except FileNotFoundError:  # removed since listed: a checkpoint of a run still going, renamed
                continue
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                found.append((os.path.join(root, n), stat.S_ISLNK(mode)))
    return sorted(found)


def refuse_links(out: str | os.PathLike[str], flag: str = "--out") -> None:
    """ValueError naming the first link, FIFO, socket or device in the folder out."""
    found = unsafe_under(out)
    if found:
        (path, is_link), more = found[0], f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        why = (f"is a symbolic link{more}; prcl writes {flag} only through paths that are not links" if is_link else
               f"is not a regular file or folder{more} (a FIFO, socket or device would block a read or write)")
        raise ValueError(f"out: {path} {why}: remove it, or choose another {flag}")


def _open_nofollow(path: str | os.PathLike[str], flags: int) -> int:
    # O_NOFOLLOW: a link at path fails with ELOOP instead of sending the write to its target
    return os.open(path, flags | os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace path's content atomically (a new temporary file renamed over it); a link is never followed."""
    tmp = f"{os.fspath(path)}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a file left there may be a hard link to another: never written into
    try:
        with os.fdopen(_open_nofollow(tmp, os.O_EXCL), "w") as f:
            f.write(text)
        os.replace(tmp, path)  # replaces a link itself, never its target
    except OSError as e:  # a full disk, a directory at path: path named, not the temporary file, which goes
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append to path; a symbolic link is never followed, and a file that is also another name's (a hard
    link) is replaced by a copy (write_text), so that the other name keeps its content."""
    fd = _open_nofollow(path, os.O_APPEND)
    with os.fdopen(fd, "a") as f:
        if os.fstat(fd).st_nlink <= 1:
            f.write(text)
            return
    with open(path) as f:
        old = f.read()
    write_text(path, old + text)


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file, a link (not its target) or a directory tree; nothing when absent."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


# ---- the run folder's lock -------------------------------------------------------------------------------

@contextlib.contextmanager
def run_lock(out: str | os.PathLike[str], name: str = ".prcl-train.lock") -> Iterator[None]:
    """Hold OUT/name for the duration: an flock (released by the kernel when the holder dies) on a file
    that names the holder's PID and host. A second run on the same folder gets a ValueError naming the
    holder; a lock file left by a process that died is taken over with a warning."""
    path = os.path.join(out, name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(fd, closefd=True) as f:
                holder = f.read().strip() or "a process that has not written its PID yet"
            raise ValueError(f"out: {out} is in use by another prcl train ({holder}; lock file {path}); wait "
                             "for it to finish or choose another --out") from None
        # a file unlinked by its releasing holder after we opened it is not the lock any more: open again;
        # one that is also another file's name (a hard link) is never written: unlinked, and a new one made
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            if os.fstat(fd).st_nlink == 1:
                break
            os.unlink(path)
        os.close(fd)
    with open(fd, "r+", closefd=True) as f:
        stale = f.read().strip()
        if stale:
            logger.warning("out: taking over the lock %s of a run that ended without releasing it (%s)", path, stale)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            # before the flock goes with the close (a waiting opener then opens afresh); only this run's file:
            # one removed meanwhile may have been replaced by another run's lock
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(f.fileno()).st_ino:
                    os.unlink(path)


def resolve_device(name: str | None, flag: str = "--device") -> "torch.device":
    """torch.device for a --device value (None: cuda when available); ValueError naming the flag for a
    name torch does not know or a device this machine does not have."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag.lstrip('-')}: unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{flag.lstrip('-')}: {name!r}, but torch sees {count} CUDA device(s) here; pass "
                             f"{flag} cpu" + (" or a smaller index" if count else ""))
    elif device.type != "cpu":
        raise ValueError(f"{flag.lstrip('-')}: {name!r} is not supported; expected cpu, cuda or cuda:N")
    return device
