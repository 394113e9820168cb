"""Credentials in URIs, masked wherever a run writes or shows a value.

A user may give shards or storage as `https://user:password@host/...`,
`s3://KEY:SECRET@bucket/...` or a presigned URL (`?X-Amz-Signature=...`). The run needs them
to read, but config.yaml, checkpoints, tracker configs, logs and error messages are read by
others (and copied around), and a process's argv is visible to everyone on the node (`ps`).
`redact` replaces the user-info of every URI with `***` and the values of query parameters
that carry credentials; everything else stays as written, so a message still names the host,
bucket and path. Idempotent.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_URI = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"<>]*)")
_SECRET_PARAM = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)"
    r"|signature|sig|token|access_token|password|secret|key|api_key|apikey)$"
)


def _mask_uri(match: re.Match[str]) -> str:
    rest = match["rest"]
    authority, sep, tail = rest.partition("/")
    if "@" in authority:  # user[:password]@host
        authority = f"{MASK}@{authority.rsplit('@', 1)[1]}"
    rest = authority + sep + tail
    path, qsep, query = rest.partition("?")
    if qsep:
        params = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            params.append(f"{name}={MASK}" if eq and _SECRET_PARAM.match(name) else item)
        rest = path + "?" + "&".join(params)
    return match["scheme"] + rest


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked."""
    return _URI.sub(_mask_uri, text) if "://" in text else text


def redact_tree(value: Any) -> Any:
    """A copy of nested dicts/lists with every string redacted (a config as written)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value
