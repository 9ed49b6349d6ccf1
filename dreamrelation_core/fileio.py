"""Atomic file writes: a reader (or a crash) never sees half a file, and a full disk is one clear error.

Every write goes to a temporary file beside the target (`.<name>.<8 random>.tmp`) that replaces
the target in one rename when it is complete. When the write fails, the temporary file is removed
and the target is left as it was. A failure for lack of space ("no space left on device", a full
quota) becomes a `DiskFullError` naming the file, the bytes it needed and the free space.

Temporary files of writes that were killed (kill -9, power loss) stay behind; `remove_stale_temps`
removes them at the next start (the run folder does it under its lock).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import DiskFullError

if TYPE_CHECKING:
    import torch

_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what mkstemp makes with our prefix / suffix
_DISK_FULL_ERRNOS = {e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None}
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "not enough space on the disk")


# ---------------------------------------------------------------------------------------------
# disk full


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the disk holding `folder` (its nearest existing parent); None if unknown."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def is_disk_full(e: BaseException | None) -> bool:
    """An OSError with ENOSPC / EDQUOT, or a library's wrapped form of it (by its message)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(path: Path, needed: int | None, written: int = 0) -> DiskFullError:
    free = free_bytes(path.parent)
    need = f"about {human_size(needed)}" if needed else f"more than the {human_size(written)} written"
    return DiskFullError(
        errno.ENOSPC,
        f"{path}: not written, the disk is full: the file needs {need}, {human_size(free)} free there. Nothing "
        "was half-written (an earlier version of the file is unchanged): free some space, or write to another disk",
    )


def _check_space(path: Path, needed: int | None) -> None:
    """Refuse before writing when the free space is known to be too small for `needed` bytes."""
    if needed:
        free = free_bytes(path.parent)
        if free is not None and free < needed:
            raise disk_full_error(path, needed)


# ---------------------------------------------------------------------------------------------
# atomic writes


def _new_temp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary data files
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` in one
    rename, when it fails the temporary file is removed and `path` is left as it was.

    For writers that open the path themselves; `atomic_file` is preferred (it sees the OS error
    of a full disk even through libraries that hide it)."""
    path = Path(path)
    _check_space(path, size_hint)
    tmp = _new_temp(path)
    try:
        try:
            yield tmp
        except BaseException as e:
            if is_disk_full(e):
                written = tmp.stat().st_size if tmp.exists() else 0
                raise disk_full_error(path, size_hint, written) from e
            raise
        _commit(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _TrackedFile:
    """A binary file that remembers the first OSError its writes raised and counts the bytes
    written: torch.save turns a failing write into an opaque RuntimeError ("unexpected pos")."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None
        self.written = 0

    def write(self, data) -> int:
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.written += n if n is not None else len(data)
        return n

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _open_for_write(path: Path) -> IO[bytes]:
    """The one place temporary files are opened for writing (the fault-injection tests put a
    full disk here)."""
    return open(path, "wb")


@contextmanager
def atomic_file(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[IO[bytes]]:
    """Yield a binary file object writing a temporary file beside `path` (see atomic_path).
    `size_hint`: the bytes the file will need, for the free-space check and the error message."""
    path = Path(path)
    _check_space(path, size_hint)
    tmp = _new_temp(path)
    f = None
    try:
        try:
            f = _TrackedFile(_open_for_write(tmp))
            try:
                yield f  # type: ignore[misc]
                f.flush()
            finally:
                f._f.close()
        except BaseException as e:
            if (f is not None and f.error is not None and is_disk_full(f.error)) or is_disk_full(e):
                raise disk_full_error(path, size_hint, f.written if f is not None else 0) from e
            raise
        _commit(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, len(data)) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors and string metadata as one .safetensors file, atomically."""
    from safetensors.torch import save

    return write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict / list / tuple (what torch.save needs at least)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save of plain data (tensors, dicts, numbers), atomically."""
    import torch

    with atomic_file(path, tensor_bytes(obj)) as f:
        torch.save(obj, f)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# leftovers of killed writes


def is_temp_file(p: Path) -> bool:
    """A temporary file of an atomic write (`.<name>.<8 random>.tmp`)."""
    return bool(_TEMP_RE.match(p.name))


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float = 0.0) -> list[tuple[Path, int]]:
    """Remove the temporary files of atomic writes that never finished (the writer was killed)
    directly inside `folder`, last modified more than `older_than_s` ago. Returns (path, size)
    of each removed. Call only where no writer can be running (the run folder's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for p in folder.iterdir():
        if not (p.is_file() and is_temp_file(p)):
            continue
        try:
            st = p.stat()
            if now - st.st_mtime >= older_than_s:
                p.unlink()
                removed.append((p, st.st_size))
        except OSError:
            pass
    return removed
