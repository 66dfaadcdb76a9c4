"""The input caps (stages/sources/safety.py) at their edges: which tar members and header
records are refused, exactly where each size cap starts, what a download shows and keeps.
Fast and in-process: archives are built byte by byte, a response is an in-memory stream."""

from __future__ import annotations

import hashlib
import http.client
import io
import re
import tarfile
import urllib.request
from pathlib import Path

import pytest

from stages.errors import UserError
from stages.sources import safety

_MB = 1 << 20


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _file(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + _pad(data)


def _long_name(name: str) -> bytes:
    """A GNU long-name record (the name of the member after it)."""
    data = name.encode() + b"\0"
    return _header("././@LongLink", len(data), tarfile.GNUTYPE_LONGNAME) + _pad(data)


def _tar(path: Path, *blocks: bytes, end: bool = True) -> Path:
    path.write_bytes(b"".join(blocks) + (bytes(1024) if end else b""))
    return path


def _read(archive: Path, want: object = lambda m: True) -> list[tuple[str, bytes | None]]:
    return [(m.name, data) for m, data in safety.iter_tar(archive, want)]


def _refused(archive: Path, want: object = lambda m: True) -> str:
    with pytest.raises(UserError) as info:
        _read(archive, want)
    return str(info.value)


# --------------------------------------------------------------------------- tar members
def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("name", ["/etc/x", "\\etc\\x", "a/../../x", "a\\..\\x", "..", "C:x",
                                  "c:/x"])
def test_a_member_that_could_leave_its_folder_is_refused(name: str) -> None:
    with pytest.raises(UserError) as info:
        safety.check_member(_member(name), "a.tar")
    assert str(info.value) == (f"a.tar: unsafe member '{name}' (absolute path or '..'); "
                               "refusing to read this archive")


@pytest.mark.parametrize(("name", "kind"), [
    ("a/b..c/x", tarfile.REGTYPE), ("a/..b", tarfile.REGTYPE), ("a/b:c", tarfile.REGTYPE),
    ("a/", tarfile.DIRTYPE), ("./a", tarfile.REGTYPE)])
def test_a_plain_member_inside_its_folder_is_read(name: str, kind: bytes) -> None:
    safety.check_member(_member(name, kind), "a.tar")


@pytest.mark.parametrize(("kind", "message"), [
    (tarfile.SYMTYPE, "member 'a/x' is a link (to '../y'); refusing to read an archive with "
                      "links"),
    (tarfile.LNKTYPE, "member 'a/x' is a link (to '../y'); refusing to read an archive with "
                      "links"),
    (tarfile.FIFOTYPE, "member 'a/x' is not a regular file or folder; refusing to read this "
                       "archive"),
    (tarfile.BLKTYPE, "member 'a/x' is not a regular file or folder; refusing to read this "
                      "archive")])
def test_links_and_special_members_are_refused(kind: bytes, message: str) -> None:
    with pytest.raises(UserError) as info:
        safety.check_member(_member("a/x", kind, "../y"), "a.tar")
    assert str(info.value) == f"a.tar: {message}"


def test_every_member_is_streamed_with_bytes_only_where_wanted(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar", _header("d/", 0, tarfile.DIRTYPE), _file("d/x", b"xx"),
                   _file("d/y", b"yyy"), _file("d/e", b""))
    assert _read(archive, lambda m: m.name != "d/y") == [
        ("d", None), ("d/x", b"xx"), ("d/y", None), ("d/e", b"")]
    bad = _tar(tmp_path / "b.tar", _file("d/x", b"xx"), _header("d/../x", 0))
    assert _refused(bad) == f"{bad}: unsafe member 'd/../x' (absolute path or '..'); " \
                            "refusing to read this archive"


def test_a_wanted_member_may_hold_exactly_the_file_cap(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_MAX_FILE_MB", str(100 / _MB))  # 100 bytes
    archive = _tar(tmp_path / "a.tar", _file("a/ok", b"x" * 100), _file("a/big", b"x" * 101))
    assert _read(archive, lambda m: m.name == "a/ok") == [("a/ok", b"x" * 100), ("a/big", None)]
    message = _refused(archive)
    assert message.startswith(f"{archive}: a/big: would decompress to 0.0 MB, more than the "
                              "0.0 MB allowed")
    assert message.endswith("; refused. If you trust it, raise CONVFLOW_MAX_FILE_MB")


@pytest.mark.parametrize("over", [0, 1])
def test_an_archive_may_expand_to_exactly_its_budget(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     over: int) -> None:
    """The header alone decides: a member claiming more than the budget is refused before a
    byte of it is read; one within it is read (and found cut short here)."""
    monkeypatch.delenv("CONVFLOW_MAX_EXPANSION", raising=False)
    budget = 32 * _MB + 50 * 1024  # a 1,024-byte archive: a header and one block of data
    size = budget - 512 + over  # the data starts after the 512-byte header
    archive = _tar(tmp_path / "a.tar", _header("a/x", size), bytes(512), end=False)
    message = _refused(archive, lambda m: False)
    if over:
        assert message == (f"{archive}: would decompress to 32.0 MB, more than the 32.0 MB "
                           "allowed (a decompression bomb or a file that is not what it "
                           "claims); refused. If you trust it, raise CONVFLOW_MAX_EXPANSION")
    else:
        assert message.startswith(f"{archive}: truncated or corrupt archive (")
        assert message.endswith("); download or copy it again")


# ------------------------------------------------------------------- tar header records
def test_a_header_record_may_be_64_kb_and_no_more(tmp_path: Path) -> None:
    name = "a/" + "n" * ((64 << 10) - 3)  # with its NUL: exactly 65,536 bytes
    ok = _tar(tmp_path / "ok.tar", _long_name(name), _file("short", b"x"))
    assert _read(ok) == [(name, b"x")]
    big = _tar(tmp_path / "big.tar", _file("a/x", b"x"),
               _header("././@LongLink", (64 << 10) + 1, tarfile.GNUTYPE_LONGNAME))
    assert _refused(big) == (f"{big}: a header record (long name or pax) of 65,537 bytes at "
                             "offset 1,024, more than the 65,536 read; a crafted or corrupt "
                             "archive, refused")


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK,
                                  tarfile.SOLARIS_XHDTYPE])
def test_every_kind_of_header_record_is_capped(tmp_path: Path, kind: bytes) -> None:
    big = _tar(tmp_path / "big.tar", _header("././@x", (64 << 10) + 1, kind))
    assert "a header record (long name or pax) of 65,537 bytes at offset 0" in _refused(big)


def test_eight_header_records_may_come_before_each_member(tmp_path: Path) -> None:
    eight = [_long_name(f"a/{i}") for i in range(8)]
    ok = _tar(tmp_path / "ok.tar", *eight, _file("x", b"1"), *eight, _file("y", b"2"))
    assert _read(ok) == [("a/0", b"1"), ("a/0", b"2")]  # the counter starts again
    nine = _tar(tmp_path / "nine.tar", _file("x", b"1"), *eight, _long_name("a/8"),
                _file("y", b"2"))
    assert _refused(nine) == (f"{nine}: more than 8 header records (long name or pax) before "
                              "one member, at offset 9,216; a crafted or corrupt archive, "
                              "refused")


def test_a_sparse_member_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "s.tar", _header("a/s", 0, tarfile.GNUTYPE_SPARSE))
    assert _refused(archive) == (f"{archive}: member 'a/s' is a sparse file; a crafted or "
                                 "corrupt archive, refused")


# ---------------------------------------------------------------------------- files read
def test_a_path_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(UserError) as info:
        safety.read_regular_file(tmp_path / "f" / "x")
    assert str(info.value) == f"{tmp_path / 'f' / 'x'}: cannot read (Not a directory)"


def test_a_file_over_the_cap_names_the_knob(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_MAX_FILE_MB", str(100 / _MB))
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(UserError) as info:
        safety.read_regular_file(tmp_path / "big")
    assert str(info.value).startswith(f"{tmp_path / 'big'}: would decompress to 0.0 MB")
    assert str(info.value).endswith("; refused. If you trust it, raise CONVFLOW_MAX_FILE_MB")


# ------------------------------------------------------------------------------ downloads
def test_a_redirect_to_https_is_followed() -> None:
    req = urllib.request.Request("http://example.org/c.tar.gz")
    for url in ("https://mirror.example.org/c.tar.gz", "HTTPS://mirror.example.org/c.tar.gz"):
        new = safety._HttpOnlyRedirects().redirect_request(req, None, 302, "Found", {}, url)
        assert new.full_url == url


class _Response(io.BytesIO):
    """An HTTP response's body and headers, as ``urlopen`` hands them over."""

    def __init__(self, body: bytes, length: int | None = None) -> None:
        super().__init__(body)
        self.headers = http.client.HTTPMessage()
        if length is not None:
            self.headers["Content-Length"] = str(length)


@pytest.mark.parametrize(("body", "length"), [(b"a" * 2048, 2048), (b"b" * 2048, None),
                                              (b"", None)])
def test_a_download_is_streamed_with_its_hash_and_a_byte_progress_bar(
        body: bytes, length: int | None, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.BytesIO()
    assert safety._stream(_Response(body, length), out, "U", len(body), "c.tar.gz") == (
        hashlib.sha256(body).hexdigest(), length)
    assert out.getvalue() == body
    bar = capsys.readouterr().err.rstrip().rsplit("\r", 1)[-1]
    if length:  # KiB (1,024 bytes), scaled, with a percentage where the length is known
        assert re.match(r"c\.tar\.gz: 100%\|█+\| 2\.00k/2\.00k \[.*B/s\]$", bar), bar
    elif body:
        assert re.match(r"c\.tar\.gz: 2\.00kB \[.*B/s\]$", bar), bar


def test_a_stream_past_its_cap_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for length in (4, None):  # announced, or found while read
        out = io.BytesIO()
        with pytest.raises(UserError) as info:
            safety._stream(_Response(b"abcd", length), out, "U", 3, "c")
        assert str(info.value) == (
            "U: the server sends more than 3 bytes; if the file really is larger, raise "
            "CONVFLOW_MAX_DOWNLOAD_MB; refused, nothing was kept. Check data.url")
        assert out.getvalue() == b""  # the block past the cap is not written
