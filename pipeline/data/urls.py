"""Shard locations: local paths, brace patterns and URLs, and how each one is opened.

Object-store URLs are turned into the usual CLI pipes (`aws s3 cp URL -`, `gsutil cat URL`),
so nodes need only the vendor CLI and its credentials, never a Python SDK.

http(s) URLs are read with `curl` under a time limit (`timeout_s`, the run config's
`data.url_timeout_s`): a server that does not connect, answer or send a byte for that long
ends the read with a `TransferError` that says so, as does an HTTP error status. Object
stores (s3://, gs://) are read through their CLIs, which keep their own retry and time-out
settings.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from pipeline.redact import redact

# Large reads matter: the tar parser issues ~4 small reads per sample.
READ_BUFFER = 1 << 20

DEFAULT_TIMEOUT_S = 30.0
"""Seconds an http(s) read may wait to connect, for an answer, or for the next byte; the
default of `DataConfig.url_timeout_s` (the one place it is set)."""
HTTP_SCHEMES = ("http", "https")
_CURL_RETRIES = 3  # quick failures (5xx, 429, reset) are retried, but only within timeout_s
_PROBE_THREADS = 16


class TransferError(OSError):
    """An http(s) transfer failed: an HTTP error status, a time-out, no connection."""

    def __init__(self, url: str, problem: str, http_status: int | None = None):
        super().__init__(f"{redact(url)}: {problem}")
        self.url, self.problem, self.http_status = url, problem, http_status


def expand(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns (`train-{000000..000009}.tar`) and `::`-joined lists → a flat list."""
    if isinstance(urls, str):
        return expand_urls(urls)
    return [u for url in urls for u in expand_urls(url)]


def local_path(url: str) -> str | None:
    """The filesystem path behind `url`, or None when it is not a local file."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    # A one-letter "scheme" is a Windows drive letter, not a protocol.
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return url
    return None


def to_pipe(url: str) -> str:
    """The URL `webdataset.gopen` should open: object stores become CLI pipes."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return f"pipe:aws s3 cp --quiet {shlex.quote(url)} -"
    if parsed.scheme == "gs":
        return f"pipe:gsutil -q cat {shlex.quote(url)}"
    return url


def join(base: str, name: str) -> str:
    """`name` inside the directory `base` (a path or a URL)."""
    if base.startswith("pipe:"):
        raise ValueError(
            f"cannot locate {name!r} next to a pipe: URL ({base!r}); list shard URLs explicitly"
        )
    if local_path(base) is not None and urlparse(base).scheme != "file":
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The directory that holds `url` (a path or a URL)."""
    if local_path(url) is not None and urlparse(url).scheme != "file":
        return os.path.dirname(os.path.abspath(url))
    return url.rsplit("/", 1)[0]


def is_http(url: str) -> bool:
    return urlparse(url).scheme in HTTP_SCHEMES


def open_stream(url: str, *, timeout_s: float | None = None) -> BinaryIO:
    """Open `url` for reading; local files are opened directly with a large buffer.

    http(s) reads give up after `timeout_s` (default DEFAULT_TIMEOUT_S) without progress;
    closing the stream raises TransferError when the transfer failed.
    """
    path = local_path(url)
    if path is not None:
        return open(path, "rb", buffering=READ_BUFFER)  # noqa: SIM115 (the caller closes it)
    if is_http(url):
        stream: Any = CurlStream(url, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        return stream
    return gopen(to_pipe(url), "rb", bufsize=READ_BUFFER)


def _curl_time_args(timeout_s: float) -> list[str]:
    # --speed-time takes whole seconds; --speed-limit 1 over it catches a server that connects
    # and then sends nothing (no answer, or a stall mid-shard). Retries stop at timeout_s, so a
    # silent server costs about timeout_s and at worst ~2 × timeout_s, never more.
    seconds = max(1, round(timeout_s))
    return [
        "--connect-timeout",
        f"{timeout_s:g}",
        "--speed-limit",
        "1",
        "--speed-time",
        str(seconds),
        "--retry",
        str(_CURL_RETRIES),
        "--retry-max-time",
        str(seconds),
    ]


_HTTP_CODE = re.compile(rb"^http_code=(\d{3})$", re.MULTILINE)


def _curl_failure(url: str, returncode: int, stderr: bytes, timeout_s: float) -> TransferError:
    """The TransferError for a curl exit status (stderr holds `-S` messages and -w output)."""
    match = _HTTP_CODE.search(stderr)
    status = int(match.group(1)) if match else 0
    said = [
        re.sub(r"^curl: \(\d+\) ", "", line)
        for line in stderr.decode("utf-8", "replace").splitlines()
        if line.startswith("curl: ")
    ]
    detail = f"curl exit {returncode}" + (f": {said[-1]}" if said else "")
    if returncode in (22, 63) and status >= 400:  # 63: an error page over --max-filesize
        return TransferError(url, f"HTTP {status}", http_status=status)
    if returncode == 28:
        return TransferError(url, f"no answer within {timeout_s:g} s (data.url_timeout_s)")
    if returncode in (5, 6, 7):
        return TransferError(url, f"cannot connect ({detail})")
    return TransferError(url, f"download failed ({detail})")


def _curl_config(url: str) -> bytes:
    """`url` as a curl config file (read with `--config -`): a URL may carry a password or a
    signature, and any user on the node can read a process's argv (`ps`)."""
    quoted = url.replace("\\", "\\\\").replace('"', '\\"')
    return f'url = "{quoted}"\n'.encode()


class CurlStream:
    """A `curl` download read through a pipe; `stream` is the pipe (see `raw_reader`).

    The data end early when the transfer fails, and a short read alone cannot tell that from
    a short file: `close` (or a read that reaches the end) raises TransferError saying why.
    """

    def __init__(self, url: str, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, self.timeout_s = url, timeout_s
        args = ["curl", "--fail", "--silent", "--show-error", "--location"]
        args += [*_curl_time_args(timeout_s), "--write-out", "%{stderr}http_code=%{http_code}\n"]
        # The URL goes in on stdin (`_curl_config`), not in argv.
        self.proc = subprocess.Popen(
            [*args, "--config", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=READ_BUFFER,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self.proc.stdin:
            self.proc.stdin.write(_curl_config(url))
        self.stream: BinaryIO = self.proc.stdout
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            return b""
        data = self.stream.read(size)
        if size < 0 or len(data) < size:  # the end: did the transfer finish or fail?
            self.close()
        return data

    def close(self) -> None:
        """Stop curl if it still runs; raise TransferError if the transfer had failed."""
        if self.closed:
            return
        self.closed = True
        self.stream.close()
        try:
            # After the end of the data curl is exiting; before it, it stops on a write to the
            # closed pipe (exit 23) or, if the server is silent, is stopped here.
            returncode = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            returncode = self.proc.wait()
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        if returncode in (0, 23) or returncode < 0:  # < 0: a signal (SIGPIPE, our kill)
            return
        raise _curl_failure(self.url, returncode, stderr, self.timeout_s)

    def __enter__(self) -> CurlStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # nothing to report to during garbage collection
            self.close()


def close(stream: Any) -> OSError | None:
    """Close `stream`; the transfer's failure (an OSError) if it had one, else None."""
    try:
        stream.close()
    except OSError as err:
        status = getattr(stream, "status", None)  # a webdataset Pipe (pipe:, s3://, gs://)
        if isinstance(err, TransferError) or not status:
            return err
        try:
            program = shlex.split(stream.args[0][0])[0]
        except (AttributeError, IndexError, TypeError, ValueError):
            program = "the command"
        return OSError(f"{program} exited with status {status}")
    return None


def probe(url: str, *, timeout_s: float | None = None) -> str | None:
    """None if the http(s) `url` can be read, else why not (`HTTP 404`, `no answer ...`).

    Asks for the first byte only; a server that ignores the range is cut off by
    --max-filesize (curl exit 63), which still proves the file is there.
    """
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    args = ["curl", "--fail", "--silent", "--show-error", "--location", "--range", "0-0"]
    args += [*_curl_time_args(timeout_s), "--max-time", f"{2 * timeout_s:g}"]
    args += ["--max-filesize", "1", "--output", os.devnull]
    args += ["--write-out", "%{stderr}http_code=%{http_code}\n", "--config", "-"]
    try:
        done = subprocess.run(args, input=_curl_config(url), capture_output=True, check=False)
    except OSError as err:  # no curl
        return f"cannot run curl ({err})"
    match = _HTTP_CODE.search(done.stderr)
    if done.returncode == 0 or (done.returncode == 63 and match and match.group(1) < b"400"):
        return None
    return _curl_failure(url, done.returncode, done.stderr, timeout_s).problem


def probe_all(url_list: Iterable[str], *, timeout_s: float | None = None) -> dict[str, str]:
    """{url: problem} for the http(s) URLs of `url_list` that cannot be read (probed at once)."""
    targets = list(dict.fromkeys(u for u in url_list if is_http(u)))
    if not targets:
        return {}
    with ThreadPoolExecutor(min(_PROBE_THREADS, len(targets))) as pool:
        problems = pool.map(lambda u: probe(u, timeout_s=timeout_s), targets)
        return {u: p for u, p in zip(targets, problems, strict=True) if p is not None}


def raw_reader(stream: BinaryIO) -> BinaryIO:
    """The buffered object to read from; skips webdataset's per-read subprocess poll on pipes.

    `Pipe.read` polls the child on every call, which costs more than parsing a tar header.
    The exit status is still checked when the pipe is closed.
    """
    return getattr(stream, "stream", stream)
