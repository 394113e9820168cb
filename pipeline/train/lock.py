"""One writer per run: the driver holds the run's lock from before the data check to its exit.

Two `capsnet train` of the same name and storage path at once interleave metrics.jsonl, share
the index's `.tmp` name and delete each other's checkpoints. So `train` takes the lock first
(`RunLock.hold`, in a `with`: released on a normal end, an error and Ctrl-C alike) and a second
run fails at once, before Ray starts, with one line naming the holder (host, pid, since when).
`capsnet train --dry-run` only looks (`RunLock.check`): a live holder fails it the same way.

Local storage: `<run folder>/.capsnet-lock`, created atomically and whole: written to a
private file (O_CREAT|O_EXCL), then hard-linked onto the lock's name, which fails if the name
exists (the classic lock-file recipe, also sound on NFS). A lock whose holder is on this host
and no longer alive is stale and taken over, with a note; one from another host is never
judged (its pid means nothing here): the message says to delete the file if that run is gone.

s3:// / gs://: a lease object `<storage_path>/<name>/.capsnet-lock`. Its creation should be
conditional (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`), and pyarrow cannot send either:
its S3 filesystem drops an `If-None-Match` given as write metadata (tried against moto: the
second write replaced the first) and its GCS filesystem has no such option. boto3 could (on
S3), but it is not a dependency of this project (only moto's, in the dev extra), so this is a
pure-pyarrow best effort: look up, write our lease, wait `settle_s` (1 s), read it back and hold
the run only if it is still ours (the last writer wins, the others fail). Two starts can
both hold the run only if one of them took longer than `settle_s` from its look-up to its
write landing (its look-up came before the other's write, its write after the other's
read-back): two starts in the same second over a slow link. That is the documented limit; a
conditional create (boto3 for s3://, as an extra) would remove it.
The holder rewrites its lease every `LEASE_REFRESH_S` (a daemon thread in the driver); a lease
not rewritten for `LEASE_STALE_S` (its holder was killed or lost its network) is stale and
taken over, with a note. The age is read from the holder's own clock (`refreshed`, UTC): clock
skew well under the 30 min is assumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from pipeline.schema import ConfigError
from pipeline.train.storage import LOCK_KEY, RunStorage

__all__ = ["LEASE_REFRESH_S", "LEASE_STALE_S", "Holder", "RunLock", "RunLockError"]

log = logging.getLogger(__name__)

LEASE_REFRESH_S = 300.0
"""How often the holder of a lease on object storage rewrites it."""
LEASE_STALE_S = 1800.0
"""A lease not rewritten for this long is stale (six missed refreshes)."""


_UNREADABLE = "unreadable"


class RunLockError(ConfigError):
    """Another live run holds this run's lock (the CLI prints it as one line, exit 2)."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lock: what the lock file or lease object holds, as JSON."""

    host: str
    pid: int
    since: float
    """When the holder took the lock (seconds since the epoch, UTC)."""
    refreshed: float
    """When the holder last rewrote its lease (== since for a local lock file)."""
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    """This acquisition's own id: tells our lease from a rival's after a write."""

    @classmethod
    def me(cls) -> Holder:
        t = _now()
        return cls(host=socket.gethostname(), pid=os.getpid(), since=t, refreshed=t)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """None for content that is not a lock we wrote (ours always appear whole)."""
        try:
            d = json.loads(data)
            host, pid, token = str(d["host"]), int(d["pid"]), str(d["token"])
            return cls(host, pid, float(d["since"]), float(d["refreshed"]), token)
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {_iso(self.since)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """The lock of the run `storage` names: a file in its local run folder, or a lease object.

    Args:
        storage: the run's storage (its `local_dir` is the run folder for local storage).
        refresh_s: seconds between lease rewrites (object storage only).
        stale_s: a lease older than this since its last rewrite is stale.
        settle_s: the pause between writing a lease and reading it back.
    """

    def __init__(
        self,
        storage: RunStorage,
        *,
        refresh_s: float = LEASE_REFRESH_S,
        stale_s: float = LEASE_STALE_S,
        settle_s: float = 1.0,
    ):
        self.storage = storage
        self.refresh_s = refresh_s
        self.stale_s = stale_s
        self.settle_s = settle_s
        self._made_dir = False  # the run folder did not exist: removed again if left empty
        self.held: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.storage.uri}/{LOCK_KEY}" if self.storage.remote else str(self._path)

    @property
    def _path(self):
        return self.storage.local_dir / LOCK_KEY

    # --- public API -------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[Holder]:
        """Take the lock for the `with` block (RunLockError if a live run holds it)."""
        holder = self.acquire()
        try:
            yield holder
        finally:
            self.release()

    def check(self) -> str:
        """What `acquire` would do, without doing it: raises RunLockError for a live holder;
        returns a note for a stale one ('' when the run is free)."""
        holder = self._read()
        if holder is None:
            return ""
        stale = self._stale(holder)
        if not stale:
            raise self._error(holder)
        return f"would take over the stale lock {self.where} ({stale})"

    def acquire(self) -> Holder:
        """Take the lock, or take over a stale one (with a note printed)."""
        me = Holder.me()
        try:
            return self._acquire(me)
        except BaseException:  # Ctrl-C between our write and its read-back: no lease left
            self.held = me
            self.release()  # only if what is there is ours
            raise

    def _acquire(self, me: Holder) -> Holder:
        for _ in range(3):  # a rival may release or take over between our steps
            if self._create(me):
                return self._start(me)
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            stale = self._stale(holder)
            if not stale:
                raise self._error(holder)
            if self._take_over(holder, me):
                log.warning("took over the stale lock %s: %s", self.where, stale)
                print(f"[capsnet] took over the stale lock {self.where}: {stale}", flush=True)
                return self._start(me)
        holder = self._read()
        raise (
            self._error(holder)
            if holder
            else RunLockError(
                f"could not take the lock {self.where}: it changed hands while we tried; retry"
            )
        )

    def release(self) -> None:
        """Drop our lock (only if it is still ours); a no-op when not held."""
        me, self.held = self.held, None
        if me is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with contextlib.suppress(Exception):  # releasing must never hide the run's own error
            current = self._read()
            if current is not None and current.token == me.token:
                if self.storage.remote:
                    self.storage.remove(LOCK_KEY)
                else:
                    self._path.unlink(missing_ok=True)
                    if self._made_dir:  # a run that failed before writing leaves no folder
                        self._path.parent.rmdir()

    # --- internals --------------------------------------------------------------------------

    def _error(self, holder: Holder) -> RunLockError:
        gone = (
            "if that run is gone, delete it"
            if not self.storage.remote
            else f"a lease not refreshed for {self.stale_s / 60:.0f} min is taken over"
        )
        return RunLockError(
            f"run {self.storage.name!r} is in use by another capsnet train ({holder.describe()}); "
            f"lock: {self.where} ({gone})"
        )

    def _stale(self, holder: Holder) -> str:
        """Why `holder` no longer holds the run ('' when it may)."""
        if holder.token == _UNREADABLE:  # not written by us: locks appear whole
            return "the lock holds no host/pid/time"
        if self.storage.remote:
            age = _now() - holder.refreshed
            if age > self.stale_s:
                return f"{holder.describe()}, last refreshed {age / 60:.0f} min ago"
            return ""
        if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
            return f"{holder.describe()}, and that process is gone"
        return ""

    def _read(self) -> Holder | None:
        if self.storage.remote:
            data = self.storage.read(LOCK_KEY)
        else:
            try:
                data = self._path.read_bytes()
            except FileNotFoundError:
                return None
        if data is None:
            return None
        return Holder.parse(data) or Holder("?", 0, 0.0, 0.0, _UNREADABLE)

    def _create(self, me: Holder) -> bool:
        if self.storage.remote:
            if self.storage.read(LOCK_KEY) is not None:
                return False
            self.storage.write(LOCK_KEY, me.encode())
            return self._still_mine(me)
        # Written whole to a private name (O_CREAT|O_EXCL), then hard-linked onto the lock's
        # name: the link fails if the name exists, and the lock never appears half-written.
        if not self._path.parent.exists():
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dir = True
        mine = self._path.with_name(f"{LOCK_KEY}.{me.token}")
        try:
            fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:  # a rival's release removed the empty folder: try again
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(me.encode())
            os.link(mine, self._path)
        except FileExistsError:
            return False
        finally:
            mine.unlink(missing_ok=True)
        return True

    def _still_mine(self, me: Holder) -> bool:
        """Read back after a write, after a pause: without a conditional create, a rival
        that looked before our write may write after it (the last writer holds the lease)."""
        time.sleep(self.settle_s)
        current = self._read()
        return current is not None and current.token == me.token

    def _take_over(self, stale: Holder, me: Holder) -> bool:
        if self.storage.remote:
            self.storage.write(LOCK_KEY, me.encode())
            return self._still_mine(me)
        # Move the stale file aside (atomic), then check it was the stale one: a rival may
        # have taken over first, and then we moved its live lock, which goes straight back.
        aside = self._path.with_name(f"{LOCK_KEY}.stale-{me.token}")
        try:
            os.rename(self._path, aside)
        except FileNotFoundError:
            return False
        moved = Holder.parse(aside.read_bytes())
        if moved is not None and moved.token != stale.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self._path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create(me)

    def _start(self, me: Holder) -> Holder:
        self.held = me
        if self.storage.remote:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._refresh, args=(me,), name="capsnet-lease", daemon=True
            )
            self._thread.start()
        return me

    def _refresh(self, me: Holder) -> None:
        """Rewrite the lease every refresh_s while it is still ours."""
        while not self._stop.wait(self.refresh_s):
            try:
                current = self._read()
                if current is None or current.token != me.token:
                    log.warning("lost the lease %s to %s", self.where, current)
                    return
                fresh = Holder(me.host, me.pid, me.since, _now(), me.token)
                self.storage.write(LOCK_KEY, fresh.encode())
            except Exception as e:  # a network hiccup: the next refresh retries
                log.warning("could not refresh the lease %s: %s", self.where, e)
