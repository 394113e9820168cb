"""Shard locations: local paths, brace patterns and URLs, and how each one is opened.

Object-store URLs are turned into the usual CLI pipes (`aws s3 cp URL -`, `gsutil cat URL`),
so nodes need only the vendor CLI and its credentials, never a Python SDK.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

# Large reads matter: the tar parser issues ~4 small reads per sample.
READ_BUFFER = 1 << 20


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


def open_stream(url: str) -> BinaryIO:
    """Open `url` for reading; local files are opened directly with a large buffer."""
    path = local_path(url)
    if path is not None:
        return open(path, "rb", buffering=READ_BUFFER)  # noqa: SIM115 (the caller closes it)
    return gopen(to_pipe(url), "rb", bufsize=READ_BUFFER)


def raw_reader(stream: BinaryIO) -> BinaryIO:
    """The buffered object to read from; skips webdataset's per-read subprocess poll on pipes.

    `Pipe.read` polls the child on every call, which costs more than parsing a tar header.
    The exit status is still checked when the pipe is closed.
    """
    return getattr(stream, "stream", stream)
