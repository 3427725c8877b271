"""Files written whole or not at all: a temporary name in the same directory, fsync, rename, fsync
the directory. Below every module that writes (model directories, checkpoints, tokenizers, logs,
exports), so that none of them imports another for it.

A write that runs out of space (ENOSPC, EDQUOT) becomes one `DiskFullError` that names the file,
about how much it needed and how much is free: the libraries below report it each in their own
words (safetensors "I/O error: No space left on device (os error 28)", PyTorch's zip writer
"unexpected pos ..." when given a path), and a temporary file is removed before the error leaves.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the Rust and C++ writers below us spell ENOSPC / EDQUOT in their messages.
_FULL_WORDS = ("no space left on device", "disk quota exceeded", f"os error {errno.ENOSPC})",
               f"os error {errno.EDQUOT})")


class DiskFullError(OSError):
    """A write that found no space left on its device (or the user's quota spent)."""

    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return str(self.strerror)


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, raised as an OSError or reported inside another library's error."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return any(word in str(error).lower() for word in _FULL_WORDS)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent), or None."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


@contextmanager
def reporting_full_disk(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Run a write of `path` (about `needed` bytes); a full disk leaves it as one DiskFullError
    naming the path, the bytes needed and the bytes free (read after the caller's clean-up)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        path = Path(path)
        free = free_bytes(path.parent)
        # Some writers (CTranslate2's C++ one) name no cause: a write that failed without an errno
        # where what it needed no longer fits is taken as the full disk.
        no_room = getattr(error, "errno", None) is None and None not in (free, needed) and free < needed
        if not (is_disk_full(error) or no_room):
            raise
        quota = getattr(error, "errno", None) == errno.EDQUOT or "quota" in str(error).lower()
        wanted = f"about {_megabytes(needed)}" if needed is not None else "more space"
        available = f"{_megabytes(free)} free there" if free is not None else "the free space unknown"
        what = "the disk quota is spent" if quota else "no space left on the device"
        raise DiskFullError(errno.EDQUOT if quota else errno.ENOSPC,
                            f"{what} writing {path}: it needs {wanted}, {available}; "
                            "free some space or choose another directory") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def publish(tmp: str | Path, path: Path, mode: int = 0o666) -> None:
    """Make a finished temporary file or directory durable and visible under `path`: its mode as
    any new file would have (mkstemp's are 0600), fsync, rename, fsync the directory, so that
    after a power loss the name holds either the old or the new content, never an empty file."""
    os.chmod(tmp, mode & ~_umask())
    for file in [Path(tmp)] if Path(tmp).is_file() else sorted(Path(tmp).iterdir()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_output(path: str | Path, data: bytes) -> None:
    """A command's output file. A new file or a plain existing one (no other links to it) is
    replaced atomically, keeping the existing file's permissions (less the umask); anything else (a symbolic link,
    /dev/stdout, a FIFO, a file with hard links) is written through in place."""
    path = Path(path)
    plain = not path.exists() or (path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1)
    if plain:
        atomic_write_bytes(path, data, mode=path.stat().st_mode & 0o7777 if path.exists() else 0o666)
        return
    with reporting_full_disk(path, len(data)), open(path, "wb") as handle:
        handle.write(data)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to `path` atomically (a crash leaves the old content or the new, never half);
    `mode` as for a new file (less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporting_full_disk(path, len(data)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            publish(tmp, path, mode)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
