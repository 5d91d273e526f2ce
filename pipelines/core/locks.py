"""Who may touch a stage folder: one writer at a time, and no writer while anyone reads its outputs.

Both are `flock`s, so the kernel drops them when the holder dies, even by SIGKILL, and a crashed process
never blocks the next one. A writer holds `.lock` (or `.lock-WORKER` for the shards and ranks of one stage)
exclusively. Each reader of a finished stage holds its own `.reader-PID-N` file; a writer about to delete
or rewrite the outputs lists the held ones and refuses, naming each reader's pid and command. Files left by
readers that died (SIGKILL gives no chance to remove them) are removed by the next reader or writer that
looks. A folder the reader may not write to (a read-only mount, another user's store) is read without a
file: nothing of this process can rewrite it, and a writer of its own is still looked for.

The order of the two checks makes every overlap safe: a writer takes its lock and then looks for readers;
a reader takes its lock and then looks for a writer. Whichever comes second sees the first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import socket
import sys
import time
from pathlib import Path

from pipelines.errors import StageError

LOCK_FILE = ".lock"
READER_PREFIX = ".reader-"
UNNAMED_READER_PREFIX = f".unnamed{READER_PREFIX}"  # a reader's file before it is locked
MANIFEST_LOCK = f"{LOCK_FILE}-manifest"
# A probe by `status` or by a reader takes a lock for a few microseconds; a writer retries this long
# before it calls the stage busy.
_CONTENDED_RETRY_S = 0.2
_reader_ids = itertools.count()
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def holder_text() -> str:
    """What a lock file says about its holder: pid, command, host and since when."""
    import datetime as dt

    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} (`{command}`) on {socket.gethostname()} since {since}"


def _try_flock(fh, kind: int) -> bool:
    try:
        fcntl.flock(fh, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class StageLock:
    """The exclusive writer lock of a stage folder."""

    def __init__(self, stage_dir: Path, stage: str, name: str = LOCK_FILE):
        self.path = Path(stage_dir) / name
        self.stage = stage
        self._fh = None

    def acquire(self, wait: bool = False) -> None:
        fh = open(self.path, "a+")
        if wait:
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + _CONTENDED_RETRY_S
            while not _try_flock(fh, fcntl.LOCK_EX):
                if time.monotonic() > deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    fh.close()
                    raise StageError(
                        f"Stage `{self.stage}` is being written by {holder} (lock {self.path}). "
                        "Wait for it to finish or stop it, then run again."
                    )
                time.sleep(0.02)
        fh.seek(0)
        fh.truncate()
        fh.write(holder_text())
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def holder(self) -> str | None:
        """The holder's line while another process holds the lock, else None."""
        try:
            fh = open(self.path)  # read-only: flock needs no write access, and nor should looking
        except FileNotFoundError:
            return None
        with fh:
            # A shared probe: two probes (two readers, or `status`) never make each other look busy.
            if _try_flock(fh, fcntl.LOCK_SH):
                fcntl.flock(fh, fcntl.LOCK_UN)
                return None
            fh.seek(0)
            return fh.read().strip() or "another process"


def writer_holders(stage_dir: Path) -> list[str]:
    """The holders of a stage's writer locks (one, or one per shard or rank), while they are held."""
    stage_dir = Path(stage_dir)
    names = sorted(p.name for p in stage_dir.glob(f"{LOCK_FILE}*") if p.name != MANIFEST_LOCK)
    holders = (StageLock(stage_dir, stage_dir.name, name).holder() for name in names)
    return [h for h in holders if h is not None]


class ReadLock:
    """A reader's hold on a finished stage's outputs, for as long as the reader uses them."""

    def __init__(self, stage_dir: Path, stage: str):
        self.stage_dir = Path(stage_dir)
        self.stage = stage
        self.path = self.stage_dir / f"{READER_PREFIX}{os.getpid()}-{next(_reader_ids)}"
        self._fh = None

    def __enter__(self) -> ReadLock:
        # Locked before it gets the name others look for, so that no sweep takes a live reader for a dead one.
        unnamed = self.stage_dir / (UNNAMED_READER_PREFIX + self.path.name.removeprefix(READER_PREFIX))
        try:
            self._fh = open(unnamed, "w")
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise
            self._fh = None  # not ours to write: read it unregistered (module docstring)
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_EX)
            self._fh.write(holder_text())
            self._fh.flush()
            os.rename(unnamed, self.path)
            reader_holders(self.stage_dir)  # removes the files of dead readers on the way
        writers = writer_holders(self.stage_dir)
        if writers:
            self.__exit__(None, None, None)
            raise StageError(
                f"Stage `{self.stage}` is being written by {writers[0]}; its outputs cannot be read until "
                "it finishes. Wait for it, then run again."
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def reader_holders(stage_dir: Path) -> list[str]:
    """The readers holding a stage's outputs now; files left by dead readers are removed on the way."""
    holders = []
    for path in sorted(Path(stage_dir).glob(f"{READER_PREFIX}*")):
        try:
            fh = open(path)
        except FileNotFoundError:  # its reader finished meanwhile
            continue
        with fh:
            if _try_flock(fh, fcntl.LOCK_EX):
                with contextlib.suppress(OSError):  # a folder we may read but not write keeps it
                    path.unlink(missing_ok=True)  # its reader died without cleaning up
                fcntl.flock(fh, fcntl.LOCK_UN)
            else:
                holders.append(fh.read().strip() or path.name)
    return holders


def refuse_while_read(stage_dir: Path, stage: str) -> None:
    """Called by a writer holding the stage lock, before it deletes or rewrites the stage's outputs."""
    readers = reader_holders(stage_dir)
    if readers:
        more = f" (and {len(readers) - 1} more)" if len(readers) > 1 else ""
        raise StageError(
            f"The outputs of `{stage}` are being read by {readers[0]}{more}; rewriting them now would change "
            "what it reads. Wait for it to finish or stop it, then run again."
        )
