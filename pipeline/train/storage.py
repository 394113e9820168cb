"""Mirror a run folder to remote storage (s3://, gs://, ...) through pyarrow's filesystems.

With `run.storage_path` local, the run folder IS `<storage_path>/<name>/` and every method
here is a no-op. With a remote `storage_path`, rank 0 writes into a local staging folder and
`RunStorage` copies it to `<storage_path>/<name>/`, the prefix Ray also writes its own
`checkpoint_*` folders to:

    storage = RunStorage(cfg.run.storage_path, cfg.run.name, run_dir)
    storage.check()                # fail fast: the bucket exists and we may write to it
    storage.pull()                 # resume: the bucket's files -> run_dir
    ...                            # each epoch, after metrics/checkpoints/figures are written:
    storage.push()                 # changed files only; a failure is a warning, retried next time
    ...
    storage.push(strict=True)      # the end of the run: a failure raises StorageError

Guarantees and limits:

* Incremental: `push` remembers (size, mtime_ns, inode) of every file it uploaded (or that
  `pull` downloaded) in this object, and uploads only files whose signature changed, so
  per-epoch pushes don't re-send unchanged TensorBoard events or checkpoints. A new object
  (a new process) re-uploads everything unless `pull` ran first.
* No half files: on S3 and GCS an object becomes visible only when its upload completes (S3
  PUT / CompleteMultipartUpload, GCS upload finalize), so a reader sees the old object or the
  new one. Because pyarrow completes an output stream even when the writer fails mid-way (its
  streams have no abort), a file is first read whole into memory (a snapshot of it at one
  moment) and only then written; files over `buffer_limit`, and every file on a filesystem
  without atomic object writes, are streamed to a temporary key (`<key>.capsnet-partial-<hex>`)
  and then moved onto the key, and the temporary key is deleted if anything fails.
* Order: the checkpoint folders are uploaded after everything else and the index
  (checkpoints.json) last (`checkpoint.upload_rank`), so the bucket never holds a checkpoint
  newer than its metrics.jsonl, nor an index naming a checkpoint it lacks (it can hold
  metrics rows newer than the checkpoint: a resume should drop rows past its epoch).
* Push never deletes remote files; files removed locally stay in the bucket.
* `pull` overwrites local files with the bucket's copies (the bucket wins) and leaves
  local-only files alone unless `mirror=True` (then it deletes them: the start of a run).
* Entries named in `ignore` (by default Ray's own: `checkpoint_*` folders,
  `checkpoint_manager_snapshot.json`, `.validate_storage_marker`) are neither pushed nor
  pulled: they are matched against the first component of each path relative to the run
  folder.

Endpoints and credentials come from pyarrow's usual sources. S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), ~/.aws, or an instance role; AWS_DEFAULT_REGION;
a non-AWS endpoint (MinIO, moto, ...) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (pyarrow
>= 15 reads both, as Ray and boto do; `http://` in it selects plain HTTP) or from the URI
query `s3://bucket/prefix?endpoint_override=host:port&scheme=http`, which wins over the
environment. GCS: GOOGLE_APPLICATION_CREDENTIALS or the VM's service account.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from pipeline.config import is_remote
from pipeline.train.checkpoint import upload_rank

__all__ = ["LOCK_KEY", "RAY_ENTRIES", "RunStorage", "StorageError", "SyncResult"]

log = logging.getLogger(__name__)

RAY_ENTRIES = ("checkpoint_*", "checkpoint_manager_snapshot.json", ".validate_storage_marker")
"""What Ray Train writes under <storage_path>/<name>/ itself: not ours to push or pull."""

PARTIAL = ".capsnet-partial"
"""Marks a temporary file or key (an upload or download in progress); never pushed or pulled."""

LOCK_KEY = ".capsnet-lock"
"""The run's lock (pipeline/train/lock.py): a local file, or a lease object; never synced."""

_CHECK_KEY = ".capsnet-storage-check"
_CHUNK = 8 << 20
_ATOMIC_WRITES = frozenset({"s3", "gcs"})  # pyarrow type_names whose object writes are atomic

T = TypeVar("T")


class StorageError(RuntimeError):
    """A remote storage operation failed; the message names the URI and what to fix."""


@dataclass(frozen=True)
class SyncResult:
    """What one push or pull did."""

    files: list[str] = field(default_factory=list)
    """Paths (relative to the run folder, '/'-separated) transferred, in transfer order."""
    bytes: int = 0
    """Bytes transferred."""
    error: str = ""
    """Why a non-strict push stopped early ('' when it completed); what it did not upload
    is retried by the next push."""

    @property
    def ok(self) -> bool:
        return not self.error


Signature = tuple[int, int, int]  # (size, mtime_ns, inode)


def _signature(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class RunStorage:
    """One run's folder: `local_dir` here, mirrored to `<storage_path>/<name>/` when remote.

    Args:
        storage_path: `run.storage_path`: a local path / file:// URI (every method is then a
            no-op: `local_dir` is the run folder), or a pyarrow URI such as
            s3://bucket/prefix or gs://bucket/prefix.
        name: the run name: one path component.
        local_dir: the local run folder (for remote storage, the staging folder).
        ignore: fnmatch patterns for top-level names that are neither pushed nor pulled.
        buffer_limit: files up to this size are snapshotted in memory and written directly
            on S3/GCS; larger ones go through a temporary key and a move.

    Raises:
        StorageError: the URI names no filesystem pyarrow knows, or pyarrow could not set it
            up (for s3:// without an endpoint, from_uri asks AWS for the bucket's region).
    """

    def __init__(
        self,
        storage_path: str,
        name: str,
        local_dir: str | os.PathLike[str],
        *,
        ignore: Sequence[str] = RAY_ENTRIES,
        buffer_limit: int = 512 << 20,
    ):
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"run name must be one path component, got {name!r}")
        self.storage_path = storage_path
        self.name = name
        self.local_dir = Path(local_dir)
        self.ignore = tuple(ignore)
        self.buffer_limit = buffer_limit
        self.remote = bool(storage_path) and is_remote(storage_path)
        self._synced: dict[str, Signature] = {}
        self._fs: pafs.FileSystem = None  # set when remote
        self._root = ""
        self._bucket = ""
        self._direct = False
        base = storage_path.split("?", 1)[0].rstrip("/")
        self.uri = f"{base}/{name}" if self.remote else str(self.local_dir)
        """Where the run's files live: `<storage_path>/<name>` (no query) or `local_dir`."""
        if self.remote:
            fs, path = self._call(
                "open", storage_path, lambda: pafs.FileSystem.from_uri(storage_path)
            )
            self._fs = fs
            self._root = f"{path.rstrip('/')}/{name}"
            self._bucket = path.split("/", 1)[0]
            self._direct = fs.type_name in _ATOMIC_WRITES

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r}, local_dir={str(self.local_dir)!r})"

    # --- public API -------------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast before training: the bucket exists and a small object can be written to
        and deleted from `<uri>/`. Raises StorageError; a no-op for local storage."""
        if not self.remote:
            return
        self._require_bucket("check")
        key = f"{self._root}/{_CHECK_KEY}"
        self._call("write to", self._uri_of(_CHECK_KEY), lambda: self._write_bytes(key, b"ok\n"))
        with contextlib.suppress(OSError):  # may write but not delete: fine (pull skips it)
            self._fs.delete_file(key)

    def push(
        self,
        paths: Iterable[str | os.PathLike[str]] | None = None,
        *,
        strict: bool = False,
        force: bool = False,
    ) -> SyncResult:
        """Upload the run folder's files that changed since they were last pushed (or pulled).

        Args:
            paths: only these files or folders (relative to `local_dir`, or absolute inside
                it); None: the whole folder. Paths that don't exist are skipped.
            strict: raise StorageError on failure (the final push of a run). Otherwise a
                failure is logged as a warning, the push stops there, and the result's
                `error` says why; every file not uploaded keeps its old signature, so the
                next push retries it. Training never dies of a per-epoch push.
            force: upload even unchanged files.

        Returns the files uploaded. A no-op (empty result) for local storage.
        """
        if not self.remote:
            return SyncResult()
        todo = []
        for rel, local in self._local_files(paths):
            try:
                sig = _signature(local.stat())
            except FileNotFoundError:  # removed since the listing
                continue
            if force or self._synced.get(rel) != sig:
                todo.append((rel, local, sig))
        todo.sort(key=lambda t: (upload_rank(t[0]), t[0]))
        done: list[str] = []
        total = 0
        for rel, local, sig in todo:
            try:  # a snapshot first: a local read error must not complete a half object
                data = local.read_bytes() if self._direct and sig[0] <= self.buffer_limit else None
            except FileNotFoundError:  # removed since the listing
                continue
            upload = functools.partial(self._upload, local, rel, data)
            try:
                self._call("upload to", self._uri_of(rel), upload)
            except StorageError as e:
                if strict:
                    raise StorageError(
                        f"{e} ({len(done)} of {len(todo)} changed files were uploaded)"
                    ) from None
                msg = f"{e}; {len(todo) - len(done)} file(s) left for the next push"
                log.warning("run folder push failed (training continues): %s", msg)
                return SyncResult(done, total, msg)
            self._synced[rel] = sig
            done.append(rel)
            total += sig[0]
        return SyncResult(done, total)

    def pull(
        self,
        *,
        mirror: bool = False,
        only: Sequence[str] | None = None,
        keep: Sequence[str] = (),
    ) -> SyncResult:
        """Download every file under `<uri>/` (but `ignore`d ones) into `local_dir`,
        overwriting local copies (each is written to a temporary file and renamed, so a
        crash never leaves half a file). Pulled files count as pushed. A key that would
        write outside `local_dir` (`..`, a leading `/`) fails the pull before any download,
        with a StorageError naming it. Nothing there (a fresh run): an empty result. Raises
        StorageError (a missing bucket, credentials, ...); a no-op for local storage.

        Args:
            mirror: also delete the local files (but `ignore`d ones and `keep`) that the
                bucket does not hold, so that the bucket is the truth; with `only`, the
                bucket's other files are not downloaded but their local copies are kept.
            only: download just these files (paths relative to the run folder).
            keep: local files `mirror` leaves alone (one this process is writing).
        """
        if not self.remote:
            return SyncResult()
        self._require_bucket("pull from")
        selector = pafs.FileSelector(self._root, recursive=True, allow_not_found=True)
        infos = self._call("list", self.uri, lambda: self._fs.get_file_info(selector))
        files = [
            (info, info.path[len(self._root) + 1 :])
            for info in sorted(infos, key=lambda i: i.path)
            if info.type == pafs.FileType.File
        ]
        for info, rel in files:  # all before any download: a bad key writes nothing
            self._require_inside(info.path, rel)
        done: list[str] = []
        total = 0
        remote = {rel for _, rel in files}
        for info, rel in files:
            if not rel or self._ignored(rel) or (only is not None and rel not in only):
                continue
            dest = self.local_dir / rel
            self._call(
                "download", self._uri_of(rel), functools.partial(self._download, info.path, dest)
            )
            self._synced[rel] = _signature(dest.stat())
            done.append(rel)
            total += info.size or 0
        if mirror:
            for rel, local in self._local_files(None):
                if rel not in remote and rel not in keep:
                    local.unlink(missing_ok=True)
                    self._synced.pop(rel, None)
                    self._remove_empty_parents(local)
        return SyncResult(done, total)

    def _remove_empty_parents(self, path: Path) -> None:
        """The folders (below `local_dir`) that deleting `path` left empty."""
        folder = path.parent
        while folder != self.local_dir and self.local_dir in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty
                return
            folder = folder.parent

    def remove(self, relpath: str | os.PathLike[str]) -> None:
        """Delete `<uri>/<relpath>` (a file or a folder) remotely; a no-op for local storage
        (the caller deletes its own files). Used to drop checkpoints the keep rule drops."""
        if not self.remote:
            return
        rel = self._relative(relpath)
        path = f"{self._root}/{rel}"

        def delete() -> None:
            info = self._fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self._fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                self._fs.delete_file(path)

        self._call("delete", self._uri_of(rel), delete)
        for key in [k for k in self._synced if k == rel or k.startswith(rel + "/")]:
            del self._synced[key]

    def exists(self, relpath: str | os.PathLike[str]) -> bool:
        """Whether `<uri>/<relpath>` exists (remote), or `local_dir/relpath` (local)."""
        rel = self._relative(relpath)
        if not self.remote:
            return (self.local_dir / rel).exists()
        path = f"{self._root}/{rel}" if rel else self._root
        info = self._call("look up", self._uri_of(rel), lambda: self._fs.get_file_info(path))
        return info.type != pafs.FileType.NotFound

    def read(self, relpath: str) -> bytes | None:
        """`<uri>/<relpath>`'s bytes, None when there is no such object (remote only)."""
        path = f"{self._root}/{self._relative(relpath)}"

        def get() -> bytes | None:
            try:
                with self._fs.open_input_stream(path) as src:
                    return src.read()
            except FileNotFoundError:
                return None

        return self._call("read", self._uri_of(relpath), get)

    def write(self, relpath: str, data: bytes) -> None:
        """Put `data` on `<uri>/<relpath>`, replacing what is there (remote only)."""
        key = f"{self._root}/{self._relative(relpath)}"
        self._call("write to", self._uri_of(relpath), lambda: self._write_bytes(key, data))

    # --- internals --------------------------------------------------------------------------

    def _uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def _ignored(self, rel: str) -> bool:
        top = rel.split("/", 1)[0]
        return (
            PARTIAL in rel
            or rel in (_CHECK_KEY, LOCK_KEY)
            or any(fnmatch.fnmatchcase(top, p) for p in self.ignore)
        )

    def _require_inside(self, key: str, rel: str) -> None:
        """A bucket key is data, not a path we trust: one whose rest after `<uri>/` has `..`
        or starts with `/` would make a pull write outside the run folder (rank 0's node)."""
        parts = rel.split("/")
        dest = (self.local_dir / rel).resolve()
        if (
            rel.startswith("/")
            or ".." in parts
            or not dest.is_relative_to(self.local_dir.resolve())
        ):
            raise StorageError(
                f"cannot pull from {self.uri}: the key {key!r} names '{rel}', which leaves the "
                f"run folder; refusing to write outside {self.local_dir} (delete that key)"
            )

    def _relative(self, path: str | os.PathLike[str]) -> str:
        p = Path(path)
        if p.is_absolute():
            try:
                p = p.relative_to(self.local_dir)
            except ValueError:
                raise ValueError(f"{path} is not inside the run folder {self.local_dir}") from None
        if ".." in p.parts:
            raise ValueError(f"{path} leaves the run folder {self.local_dir}")
        rel = p.as_posix()
        return "" if rel == "." else rel

    def _local_files(
        self, paths: Iterable[str | os.PathLike[str]] | None
    ) -> list[tuple[str, Path]]:
        """(relpath, path) of the regular files to consider, ignored ones left out."""
        roots = [""] if paths is None else [self._relative(p) for p in paths]
        out: dict[str, Path] = {}
        for rel in roots:
            start = self.local_dir / rel
            if start.is_file():
                out[rel] = start
            elif start.is_dir():
                for dirpath, _, filenames in os.walk(start):
                    for fn in filenames:
                        path = Path(dirpath, fn)
                        if path.is_file():
                            out[path.relative_to(self.local_dir).as_posix()] = path
        return [(rel, p) for rel, p in sorted(out.items()) if not self._ignored(rel)]

    def _require_bucket(self, action: str) -> None:
        info = self._call(action, self.uri, lambda: self._fs.get_file_info(self._bucket))
        if info.type == pafs.FileType.NotFound:
            raise StorageError(
                f"cannot {action} {self.uri}: the bucket '{self._bucket}' does not exist "
                f"(create it, or fix run.storage_path{self._endpoint_note()})"
            )

    def _write_bytes(self, key: str, data: bytes) -> None:
        with self._fs.open_output_stream(key) as out:
            out.write(data)

    def _upload(self, local: Path, rel: str, data: bytes | None) -> None:
        """`data` (the file's snapshot) straight onto the key, or, when None, the file
        streamed to a temporary key that is then moved onto the key."""
        key = f"{self._root}/{rel}"
        if data is not None:
            self._write_bytes(key, data)
            return
        tmp = f"{key}{PARTIAL}-{uuid.uuid4().hex[:12]}"
        try:
            with open(local, "rb") as src, self._fs.open_output_stream(tmp) as out:
                shutil.copyfileobj(src, out, _CHUNK)
            self._fs.move(tmp, key)
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.delete_file(tmp)
            raise

    def _download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}{PARTIAL}-{uuid.uuid4().hex[:12]}")
        try:
            with self._fs.open_input_stream(key) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _endpoint_note(self) -> str:
        """Which S3 endpoint pyarrow used, when it isn't AWS's: the URI's or the env's."""
        if not self.storage_path.startswith("s3://"):
            return ""
        if "endpoint_override=" in self.storage_path:
            return "; endpoint from the URI's endpoint_override"
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(var):
                return f"; endpoint {os.environ[var]} from {var}"
        return ""

    def _call(self, action: str, uri: str, fn: Callable[[], T]) -> T:
        """fn(), with pyarrow's OSError/ArrowException turned into a StorageError."""
        try:
            return fn()
        except StorageError:
            raise
        except (OSError, ValueError) as e:  # pyarrow's errors: OSError, ArrowInvalid, ...
            raise StorageError(_explain(e, action, uri, self._endpoint_note())) from None


def _explain(error: BaseException, action: str, uri: str, endpoint_note: str = "") -> str:
    """A one-paragraph message for a pyarrow filesystem error: what failed, the likely cause
    and what to set, then pyarrow's own first line."""
    text = str(error).strip()
    low = text.lower()
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "s3":
        creds = (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an "
            "instance role), and AWS_ENDPOINT_URL for a non-AWS endpoint"
        )
    elif scheme in ("gs", "gcs"):
        creds = (
            "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file "
            "(or run on a VM whose service account may write the bucket)"
        )
    else:
        creds = "check the credentials for this filesystem"
    if (
        "no_such_bucket" in low
        or "nosuchbucket" in low
        or "bucket does not exist" in low
        or ("bucket" in low and "not found" in low)
    ):
        reason = f"the bucket does not exist (create it, or fix run.storage_path{endpoint_note})"
    elif any(
        s in low
        for s in ("network_connection", "could not connect", "couldn't connect", "resolve host")
    ):
        reason = f"the storage endpoint is unreachable{endpoint_note}"
    elif any(
        s in low
        for s in (
            "access_denied",
            "accessdenied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "forbidden",
            "credential",
            "permission_denied",
            "unauthenticated",
            "http status 401",
            "http status 403",
        )
    ):
        reason = f"access denied or no credentials: {creds}"
    elif "unrecognized filesystem type" in low or "unsupported" in low:
        reason = "pyarrow has no filesystem for this URI (use s3://, gs://, ...)"
    else:
        reason = f"{type(error).__name__}"
    first = text.splitlines()[0] if text else repr(error)
    return f"cannot {action} {uri}: {reason}. pyarrow said: {first}"
