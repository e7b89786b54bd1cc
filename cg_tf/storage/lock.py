"""One process at a time in a run directory.

    with lock.hold(directory, "training"):
        ...  # no other process trains, builds or runs a stage in `directory`

The lock is the file `<directory>/.lock`: a JSON record of its holder (host
name and boot id, pid, what it does, when it started, a random nonce, and a
heartbeat time that a daemon thread rewrites every `REFRESH_SECONDS` while the
lock is held). Another process asking for the directory gets `Busy`, whose
message names the holder. A lock is stale, and taken over with a warning, when
  - its holder ran on this host (same host name and boot id) and its pid is
    gone, or is this process's own (which does not hold it): a killed run never
    blocks the next one on the same machine;
  - its holder ran on another host, or on this one before a reboot, and its
    heartbeat is older than `STALE_SECONDS`: there a pid means nothing, only
    silence does (host clocks must agree to well within that time).
A file at the lock's name that is not such a record is never taken over.

Creating the lock is exclusive. On a local (POSIX, NFS) path a complete temp
file is hard-linked to the lock's name, which fails if it exists; a stale lock
is first renamed aside and put back if it turns out to be a fresh one, so of
two processes taking it over exactly one wins. tf.io.gfile paths (gs://, ...)
have no exclusive create: the lock is written if absent and read back after
`SETTLE_SECONDS`; it is held only if it is still this process's (the last
writer wins, so of two racing writers the earlier backs off). What race is left
(a writer slower than the settle time) the heartbeat catches: it reads the lock
before each refresh, and a holder that finds another nonce there has lost the
lock; its `check()`, which holders call before writing results (a checkpoint,
a manifest), then raises `LockLost`.

Within one thread the lock is re-entrant (a pipeline stage holds its directory
while the trainer it runs takes it again); other threads get `Busy`.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import tensorflow as tf

from cg_tf.storage import files

LOCK_FILE = ".lock"
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0
SETTLE_SECONDS = 2.0


class LockError(ValueError):
    """A directory that cannot be locked (the message says why)."""


class Busy(LockError):
    """Another process (or thread) holds the directory."""


class LockLost(LockError):
    """Another process took the lock over while this one held it."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Holder:
    """The record in a lock file."""
    host: str
    boot_id: str
    pid: int
    purpose: str
    started: float
    heartbeat: float
    nonce: str

    @classmethod
    def me(cls, purpose: str) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), _boot_id(), os.getpid(), purpose, now, now,
                   uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str | None) -> "Holder | None":
        try:
            return cls(**json.loads(text or ""))
        except (ValueError, TypeError):
            return None

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def stale_because(self, stale_after: float) -> str | None:
        """Why this holder no longer holds its lock, or None if it may."""
        if (self.host, self.boot_id) == (socket.gethostname(), _boot_id()):
            if self.pid == os.getpid():
                return f"pid {self.pid} is this process, which does not hold it"
            return None if _alive(self.pid) else f"pid {self.pid} is gone"
        silent = time.time() - self.heartbeat
        return f"no heartbeat for {silent:.0f} s" if silent > stale_after else None

    def __str__(self) -> str:
        return (f"{self.purpose} by pid {self.pid} on {self.host} (started "
                f"{_utc(self.started)}, heartbeat {time.time() - self.heartbeat:.0f} s ago)")


def _nonce(text: str | None) -> str | None:
    holder = Holder.parse(text)
    return holder.nonce if holder else None


class LocalStorage:
    """Local (POSIX) files: exclusive create by hard link, atomic replace."""

    def create(self, path: str, text: str) -> bool:
        tmp = self._temp(path, text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def read(self, path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace(self, path: str, text: str) -> None:
        os.replace(self._temp(path, text), path)

    def remove_if(self, path: str, nonce: str) -> None:
        """Removes the lock at `path` if it is `nonce`'s. It is renamed aside
        first (atomic), so a fresh lock that replaced it meanwhile is put back."""
        aside = f"{path}.{uuid.uuid4().hex}.aside"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            if _nonce(self.read(aside)) != nonce:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
        finally:
            os.remove(aside)

    @staticmethod
    def _temp(path: str, text: str) -> str:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        return tmp


class SharedStorage:
    """tf.io.gfile paths (gs://...): no exclusive create, so a lock written
    where none was is held only if it reads back unchanged `settle` s later."""

    def __init__(self, settle: float = SETTLE_SECONDS):
        self.settle = settle

    def create(self, path: str, text: str) -> bool:
        if tf.io.gfile.exists(path):
            return False
        self.replace(path, text)
        time.sleep(self.settle)
        return self.read(path) == text

    def read(self, path: str) -> str | None:
        try:
            with tf.io.gfile.GFile(path) as f:
                return f.read()
        except tf.errors.NotFoundError:
            return None

    def replace(self, path: str, text: str) -> None:
        with tf.io.gfile.GFile(path, "w") as f:  # one object, written whole
            f.write(text)

    def remove_if(self, path: str, nonce: str) -> None:
        if _nonce(self.read(path)) == nonce:
            with contextlib.suppress(tf.errors.NotFoundError):
                tf.io.gfile.remove(path)


def storage_for(directory: str) -> LocalStorage | SharedStorage:
    return SharedStorage() if "://" in directory else LocalStorage()


class Lock:
    """The lock of one directory; see the module docstring. Use `hold()`."""

    def __init__(self, directory: str, purpose: str,
                 storage: LocalStorage | SharedStorage | None = None,
                 refresh: float = REFRESH_SECONDS, stale_after: float = STALE_SECONDS):
        self.directory, self.purpose = directory, purpose
        self.path = os.path.join(directory, LOCK_FILE)
        self.storage = storage or storage_for(directory)
        self.refresh, self.stale_after = refresh, stale_after
        self.holder: Holder | None = None  # this process's record, once held
        self.lost: str | None = None  # who holds the lock now, if the heartbeat found another
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lock":
        """Takes the lock (over, if stale) or raises `Busy` naming its holder."""
        try:
            tf.io.gfile.makedirs(self.directory)
            for _ in range(3):  # a stale lock removed, or one released meanwhile: again
                me = Holder.me(self.purpose)
                if self.storage.create(self.path, me.dumps()):
                    self.holder = me
                    self._thread = threading.Thread(target=self._beat, daemon=True,
                                                    name=f"heartbeat {self.path}")
                    self._thread.start()
                    return self
                text = self.storage.read(self.path)
                other = Holder.parse(text)
                if text is not None and other is None:
                    raise Busy(f"{self.path} is not a lock this program wrote; remove it if "
                               f"no process uses {self.directory}")
                if other is not None:
                    why = other.stale_because(self.stale_after)
                    if why is None:
                        raise Busy(f"{self.directory} is in use: {other}; wait for it to "
                                   f"end, or use another directory")
                    logging.warning("taking over the lock of %s from %s: %s", self.directory,
                                    other, why)
                    self.storage.remove_if(self.path, other.nonce)
        except (OSError, tf.errors.OpError) as e:
            if refusal := files.refused_write(e, self.directory):
                raise LockError(f"cannot write {self.directory}: {refusal.reason} "
                                f"({refusal.remedy})") from e
            raise LockError(f"cannot lock {self.directory}: {e}") from e
        raise Busy(f"{self.directory}: other processes kept taking its lock; try again")

    def check(self) -> None:
        """Raises `LockLost` if another process has taken the lock over."""
        if self.lost:
            raise LockLost(f"{self.directory} was taken over by {self.lost}; stopped before "
                           f"writing more to it")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.holder and not self.lost:
            self.storage.remove_if(self.path, self.holder.nonce)

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh):
            try:
                current = Holder.parse(self.storage.read(self.path))
                if current is None or current.nonce != self.holder.nonce:
                    self.lost = str(current) if current else "nobody (its lock file is gone)"
                    logging.error("lost the lock of %s: it is held by %s", self.directory,
                                  self.lost)
                    return
                self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
                self.storage.replace(self.path, self.holder.dumps())
            except (OSError, tf.errors.OpError) as e:  # transient: try again next time
                logging.warning("could not refresh the lock %s: %s", self.path, e)


# Locks this process holds: key -> [lock, thread id, depth].
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def _key(directory: str) -> str:
    return directory.rstrip("/") if "://" in directory else os.path.realpath(directory)


@contextlib.contextmanager
def hold(directory: str, purpose: str, **kwargs):
    """Holds `directory` inside the block (re-entrant within a thread); raises
    `Busy` naming the holder if another process or thread has it."""
    key = _key(directory)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            held = _HELD[key] = [Lock(directory, purpose, **kwargs), None, 0]
            try:
                held[0].acquire()
            except BaseException:
                del _HELD[key]
                raise
            held[1] = threading.get_ident()
        elif held[1] != threading.get_ident():
            raise Busy(f"{directory} is in use: {held[0].holder} (another thread of this "
                       f"process)")
        held[2] += 1
    try:
        yield held[0]
    finally:
        with _HELD_GUARD:
            held[2] -= 1
            if held[2] == 0:
                del _HELD[key]
                held[0].release()
