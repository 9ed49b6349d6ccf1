"""An exclusive lock on a run folder: one trainer per folder, on Linux, macOS and Windows.

`RunLock(run_dir)` (a context manager) holds `<run_dir>/.dreamrelation.lock` for the whole run:
- taking it: the file is created with O_EXCL and, while it is open, locked by the operating
  system (`fcntl.flock` on POSIX, `msvcrt.locking` on Windows); it holds the holder's PID, the
  start time of that process (Linux), the host name and the time the lock was taken;
- a second trainer finds the file and cannot take the OS lock: it refuses at once with a
  `RunLockedError` naming the holder (PID, host, since when) and what to do;
- a dead holder (killed with -9, crashed, the machine rebooted) holds no OS lock any more: the
  next trainer takes the file over and says so (`took_over`). Where the OS lock is not available
  (some network file systems), a holder on this host counts as dead when its PID is not running
  (or runs another program: its start time differs); a holder on another host is never taken
  over: the message says to delete the lock file if that run is really gone;
- released on every exit (the file is removed; an empty run folder that the lock itself created
  is removed too, so a run that failed before writing anything leaves nothing).
Within one process the lock is re-entrant for the thread holding it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import RunLockedError

log = logging.getLogger("dreamrelation")

LOCK_FILE = ".dreamrelation.lock"
_WINDOWS_LOCK_OFFSET = 1 << 30  # msvcrt locks a byte range; a byte past the text keeps it readable
_held: dict[str, tuple[int, int]] = {}  # resolved run folder -> (thread id, depth) in this process
_held_guard = threading.Lock()


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` as the OS keeps it (Linux: clock ticks after boot); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_running(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _os_lock(fd: int) -> bool:
    """Take the OS lock on an open lock file without waiting; False when another process holds it.
    Raises OSError when the file system offers no such lock."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _os_unlock(fd: int) -> None:
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "a process that left no details"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, running since {when}"


class RunLock:
    """The lock of one run folder (module docstring). `took_over` describes a dead holder replaced."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.took_over: str | None = None
        self._key = str(self.run_dir.resolve())
        self._created_dir = False
        self._nested = False

    # -- taking ---------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        with _held_guard:
            owner = _held.get(self._key)
            if owner is not None:
                if owner[0] != threading.get_ident():
                    raise self._locked({"pid": os.getpid(), "host": socket.gethostname()}, "another thread")
                _held[self._key] = (owner[0], owner[1] + 1)
                self._nested = True
                return self
        if not self.run_dir.is_dir():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        try:
            for _ in range(50):
                if self._try_create() or self._try_take_over():
                    break
                time.sleep(0.05)  # the file changed under us (removed / replaced): look again
            else:
                raise RunLockedError(f"{self.run_dir}: could not take the run folder's lock {self.path} (it keeps changing)")
        except BaseException:
            self._remove_created_dir()
            raise
        with _held_guard:
            _held[self._key] = (threading.get_ident(), 1)
        return self

    def _info(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "process_start": process_start_time(pid), "host": socket.gethostname(), "since": time.time()}

    def _write_info(self, fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self._info()).encode("utf-8"))
        os.fsync(fd)

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        try:
            _os_lock(fd)
        except OSError:
            pass  # no OS lock on this file system: the PID in the file stands alone
        self._write_info(fd)
        self.fd = fd
        return True

    def _try_take_over(self) -> bool:
        """The lock file exists: refuse if its holder lives, take it over if not. False: look again."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False  # released meanwhile
        try:
            try:
                free = _os_lock(fd)
                os_lock = True
            except OSError:
                free, os_lock = True, False
            info = _read_info(fd)
            if not free:
                raise self._locked(info)
            if not self._same_file(fd):
                os.close(fd)
                return False
            if not info and time.time() - os.fstat(fd).st_mtime < 2.0:
                _os_unlock(fd)  # just created, details not written yet: its creator is alive
                os.close(fd)
                return False
            if self._holder_alive(info, os_lock):
                raise self._locked(info)
        except BaseException:
            if self.fd != fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self.took_over = _describe(info)
        log.warning("%s: the run folder's lock was held by %s, which is no longer running: taken over",
                    self.run_dir, self.took_over)
        self._write_info(fd)
        self.fd = fd
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    @staticmethod
    def _holder_alive(info: dict[str, Any], os_lock: bool) -> bool:
        """Only asked when the OS lock was free (a dead holder) or is not supported."""
        pid = info.get("pid")
        if not isinstance(pid, int) or info.get("host") != socket.gethostname():
            return not os_lock  # no OS lock and another host: never assume it is dead
        if os_lock:
            return False  # the OS lock was free: the process that held it is gone
        if not pid_running(pid):
            return False
        started = info.get("process_start")
        return started is None or started == process_start_time(pid)

    def _locked(self, info: dict[str, Any], who: str | None = None) -> RunLockedError:
        holder = who or _describe(info)
        return RunLockedError(
            f"{self.run_dir} is in use by another training run ({holder}; lock file {self.path}). Wait for it to "
            "finish or stop it (Ctrl+C, or Cancel in ComfyUI; it checkpoints first), or train under another run "
            "name / output folder. If no such process is running, delete the lock file"
        )

    # -- releasing ------------------------------------------------------------------------------
    def release(self) -> None:
        if self._nested:
            with _held_guard:
                tid, depth = _held[self._key]
                _held[self._key] = (tid, depth - 1)
            self._nested = False
            return
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with _held_guard:
            _held.pop(self._key, None)
        if os.name == "nt":  # an open file cannot be removed on Windows: close first
            _os_unlock(fd)
            os.close(fd)
            self._unlink()
        else:  # removed while still locked: a waiting taker then sees another file and looks again
            self._unlink()
            _os_unlock(fd)
            os.close(fd)
        self._remove_created_dir()

    def _unlink(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a run that wrote nothing leaves no folder
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this thread holds the lock of `run_dir`."""
    with _held_guard:
        owner = _held.get(str(Path(run_dir).resolve()))
        return owner is not None and owner[0] == threading.get_ident()
