"""Files written whole or not at all: a temporary name in the same directory, fsync, rename, fsync
the directory. Below every module that writes (model directories, checkpoints, tokenizers, logs,
exports), so that none of them imports another for it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a crash leaves the old content or the new, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
