"""Run folders: default names that no other run shares, and an exclusive lock held for a run's life.

The default folders (``conf/config.yaml``) end with ``${launch_id:}``, a short random id drawn once per launch and
passed to the job processes a launcher starts through the environment (``SEMVAE_LAUNCH_ID``), so that two runs
started in the same second never share a folder while every job of one sweep agrees on its sweep folder.

``hold(run_dir)`` takes an exclusive ``flock`` on ``run_dir/.lock`` and writes who holds it; a second process on the
same folder is refused at once with that information. The kernel drops the lock when the holder exits, even by
``kill -9``, so there are no stale locks to clean up. The lock is opened without following a symbolic link and only
as a regular file, so a link planted as ``.lock`` cannot turn the lock's write against another file.

``check_links(run_dir)`` refuses a folder where a file the run or Hydra writes (``run.log``, ``.hydra/``, ...) is a
symbolic link: those files are opened for writing by code that follows links (Hydra's log handler, say).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from semvae.errors import InputError

LOCK_FILE = ".lock"
LAUNCH_ID_ENV = "SEMVAE_LAUNCH_ID"

_held: dict[Path, int] = {}  # run dir -> file descriptor of its lock, for the folders this process holds


class RunDirError(InputError):
    """The run folder cannot be used: a planted link, a lock that is not a file, another run's files."""


class RunDirBusy(RunDirError):
    """Another process holds the run dir; the message names the folder and the holder."""


def launch_id() -> str:
    """Six hex digits, the same in this process and the job processes it starts, different for every launch."""
    return os.environ.setdefault(LAUNCH_ID_ENV, secrets.token_hex(3))


def register_resolver() -> None:
    """Make ``${launch_id:}`` available to the configs."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("launch_id", launch_id, replace=True)


def check_free(run_dir: str | Path) -> None:
    """RunDirBusy if another process holds ``run_dir``; RunDirError if its lock is not a regular file. Creates and
    changes nothing."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or not os.path.lexists(run_dir / LOCK_FILE):
        return
    fd = _open_lock(run_dir / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(run_dir, os.read(fd, 4096).decode(errors="replace")) from None
    finally:
        os.close(fd)


def hold(run_dir: str | Path) -> Path:
    """Lock ``run_dir`` for this process (creating it) until ``release`` or the process's end; RunDirBusy if
    another process holds it, RunDirError if its ``.lock`` is a link or not a regular file (nothing is written
    then). Holding a folder this process already holds is a no-op."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a folder; choose another run folder (hydra.run.dir)")
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        raise _busy(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder()).encode())
    _held[run_dir] = fd
    return run_dir


def _open_lock(path: Path, flags: int) -> int:
    """A descriptor of the lock file ``path``: never through a symbolic link, never anything but a regular file
    (a folder or a FIFO there would block or fail later). RunDirError naming the file otherwise."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        kind = "a symbolic link" if os.path.islink(path) else f"not a lock file ({error.strerror})"
        raise RunDirError(f"{path} is {kind}; remove it or choose another run folder (hydra.run.dir)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path} is not a regular file; remove it or choose another run folder (hydra.run.dir)")
    return fd


# what Hydra and a run write into a run folder by name; a symbolic link under any of these names is refused
WRITTEN = (
    LOCK_FILE,
    "run.log",
    ".hydra",
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "wandb.json",
    "last.pt",
    "best.pt",
    "model.pth",
    "error.txt",
    "failures.json",
    "multirun.yaml",
)


def check_links(run_dir: str | Path) -> None:
    """RunDirError if ``run_dir`` holds a symbolic link among its entries, in ``.hydra/`` or in ``models/`` (a run
    makes none there, and writing through one would write outside the folder), or holds a file Hydra or the run
    writes as something else (``.hydra`` a file, ``run.log`` a folder)."""
    run_dir = Path(run_dir)
    candidates = list(run_dir.iterdir()) if run_dir.is_dir() else []
    for sub in (".hydra", "models"):
        if (run_dir / sub).is_dir() and not (run_dir / sub).is_symlink():
            candidates += list((run_dir / sub).iterdir())
    for path in candidates:
        if path.is_symlink():
            raise RunDirError(
                f"{path} is a symbolic link; a run writes its own files in its folder and does not follow links: "
                "remove it or choose another run folder (hydra.run.dir)"
            )
    for name in WRITTEN:
        path = run_dir / name
        wrong = path.exists() and (not path.is_dir() if name == ".hydra" else not path.is_file())
        if wrong:
            raise RunDirError(
                f"{path} is not the {'folder' if name == '.hydra' else 'file'} a run writes there; remove it or "
                "choose another run folder (hydra.run.dir)"
            )


def release(run_dir: str | Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def held(run_dir: str | Path) -> Iterator[Path]:
    """``hold`` for the duration of a block; a folder this process held before stays held after it."""
    already = Path(run_dir).resolve() in _held
    path = hold(run_dir)
    try:
        yield path
    finally:
        if not already:
            release(path)


def _busy(run_dir: Path, holder: str) -> RunDirBusy:
    return RunDirBusy(
        f"{run_dir} is in use by another run ({_describe(holder)}); wait for it to end or choose another folder "
        "(hydra.run.dir)"
    )


def _holder() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} since {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"
