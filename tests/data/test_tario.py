"""The tar reader and writer against Python's tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.tario import (
    TarFormatError,
    TarWriter,
    bad_name,
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


def _renamed(member: bytes, raw_name: bytes) -> bytes:
    """`member` (a header block) with its name replaced by raw bytes, checksum redone."""
    header = bytearray(member[:512])
    header[0:100] = raw_name.ljust(100, b"\0")
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + member[512:]


def test_names_that_are_not_utf8_do_not_stop_the_reader():
    data = _tarfile_bytes(MEMBERS)
    bad = _renamed(data[:1536], b"0000\xff0001.img.u8") + data[1536:]  # first member's name
    members = list(iter_members(io.BytesIO(bad)))
    assert len(members) == len(MEMBERS) and members[1:] == MEMBERS[1:]
    assert bad_name(members[0][0]) and not bad_name(members[1][0])
    assert members[0][0].encode("utf-8", "surrogateescape") == b"0000\xff0001.img.u8"
    assert [key for key, _ in iter_samples(io.BytesIO(bad))][1:] == ["000000001", "000000002"]
