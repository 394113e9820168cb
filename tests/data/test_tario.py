"""The tar reader and writer against Python's tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.tario import (
    TarFormatError,
    TarWriter,
    iter_members,
    iter_samples,
    split_key,
    ustar_header,
)


def _tarfile_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SAMPLES = [
    ("000000001", {"img.u8": bytes(range(256)) * 3, "cls": b"7"}),
    ("000000002", {"img.u8": b"\x00" * 512, "cls": b"12", "json": b"{}"}),
]
MEMBERS = [(f"{k}.{f}", d) for k, fields in SAMPLES for f, d in fields.items()]


def test_writer_output_equals_tarfile_byte_for_byte():
    buf = io.BytesIO()
    with TarWriter(buf) as writer:
        for key, fields in SAMPLES:
            writer.write(key, fields)
    assert buf.getvalue() == _tarfile_bytes(MEMBERS)
    assert ustar_header("a.b", 5) == ustar_header("a.b", 5)


def test_reader_groups_samples_like_webdataset():
    assert list(iter_samples(io.BytesIO(_tarfile_bytes(MEMBERS)))) == SAMPLES
    assert split_key("dir/0001.img.u8") == ("dir/0001", "img.u8")
    assert split_key("a.b.c/0001") == ("a.b.c/0001", "")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_handles_long_names(fmt):
    long_name = "d" * 120 + "/0001.img.u8"
    assert list(iter_members(io.BytesIO(_tarfile_bytes([(long_name, b"xy")], fmt)))) == [
        (long_name, b"xy")
    ]


@pytest.mark.parametrize("cut", [100, 512 + 10, 2048, -1024 * 10])
def test_truncated_archive_raises(cut):
    data = _tarfile_bytes(MEMBERS)
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_members(io.BytesIO(data[:cut])))


def test_garbage_header_raises():
    data = bytearray(_tarfile_bytes(MEMBERS))
    data[1536 + 257 : 1536 + 262] = b"XXXXX"  # magic of the second member
    with pytest.raises(TarFormatError, match="corrupt"):
        list(iter_members(io.BytesIO(bytes(data))))


def test_keys_with_dots_are_rejected():
    with pytest.raises(ValueError, match="must not contain"):
        TarWriter(io.BytesIO()).write("a.b", {"cls": b"1"})
