"""ingest, source cifar10: the official python archive, verified, fetched once, read safely."""

from __future__ import annotations

import functools
import http.server
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from cifar_format import (
    CIFAR10_CLASSES,
    Evil,
    batch,
    py2_batch_pickle,
    random_batches,
    tar_with,
    write_tar,
)

from stages.errors import UserError
from stages.fetch import main as fetch_main
from stages.sources.cifar10 import load_cifar10
from stages.sources.safety import DownloadError, download, sha256_file

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _load(path: Path, sha: str | None = None):  # noqa: ANN202
    return load_cifar10(str(path), URL, sha or sha256_file(path))


def test_reads_pixels_labels_and_classes_of_the_official_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batches = random_batches(10, 4)
    datas = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(6)]
    labels = [[i % 10, (i + 3) % 10] for i in range(6)]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, d, lab in zip(names, datas, labels, strict=True):
        batches[name] = batch(d, lab)
    data = _load(write_tar(tmp_path / "c.tar.gz", batches))
    assert data.classes == CIFAR10_CLASSES and data.source == "cifar10"
    assert data.train_images.shape == (10, 3, 32, 32) and data.test_images.shape == (2, 3, 32, 32)
    # rows are 1024 red, 1024 green, 1024 blue values, row-major: pixel (y=1, x=2) of image 3
    row = datas[1][1]
    assert data.train_images[3, :, 1, 2].tolist() == [row[34], row[1024 + 34], row[2048 + 34]]
    assert data.train_labels.tolist() == [v for lab in labels[:5] for v in lab]
    assert data.test_labels.tolist() == labels[5] and data.train_labels.dtype == np.int64


# ------------------------------------------------------------------------------ download
@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server serving a small official-format archive; yields (url, file)."""
    root = tmp_path / "www"
    root.mkdir()
    archive = write_tar(root / "cifar-10-python.tar.gz", random_batches(50, 10))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz", archive
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        _QuietHandler.requests.append(self.path)


def test_fetch_downloads_once_with_progress_and_ingest_reads_its_folder(
        served: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    url, archive = served
    sha = sha256_file(archive)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {
        "source": "cifar10", "path": "data/download", "url": url, "sha256": sha}}))
    _QuietHandler.requests.clear()
    fetch_main(["--out", "data/download"])
    assert "100%" in capfd.readouterr().err  # the tqdm progress bar
    fetched = tmp_path / "data" / "download"
    assert [p.name for p in fetched.iterdir()] == ["cifar-10-python.tar.gz"]  # no partial file
    assert sha256_file(fetched / "cifar-10-python.tar.gz") == sha
    # the one download route: the source reads fetch's folder and never the network
    data = load_cifar10("data/download", url, sha)
    assert len(data.train_labels) == 50 and len(_QuietHandler.requests) == 1
    assert np.array_equal(data.train_images, _load(archive).train_images)


def test_without_data_path_the_source_names_fetchs_folder() -> None:
    with pytest.raises(UserError, match="data.path: not set.*data/download"):
        load_cifar10(None, URL, "0" * 64)


def test_a_wrong_url_is_a_user_error_not_a_retry(
        served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    with pytest.raises(UserError, match="HTTP 404.*check data.url") as info:
        download(url.replace("cifar-10", "cifar-100"), tmp_path / "dl" / "c.tar.gz", "0" * 64)
    assert not isinstance(info.value, DownloadError)


def test_download_with_the_wrong_checksum_is_not_kept(
        served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    with pytest.raises(UserError, match=r"sha256 .*expected 0{64}.*not kept"):
        download(url, tmp_path / "dl" / "c.tar.gz", "0" * 64)
    assert list((tmp_path / "dl").iterdir()) == []


def test_no_connection_says_so_and_how_to_use_a_local_copy(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    with pytest.raises(UserError) as info:
        download(f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", dest, "0" * 64)
    msg = str(info.value)
    assert isinstance(info.value, DownloadError)  # worth a retry, unlike a bad file
    assert "could not download" in msg and "refused" in msg.lower()
    assert "data.path" in msg and str(dest) in msg


class _CutOffHandler(http.server.BaseHTTPRequestHandler):
    """Promises a megabyte, sends a kilobyte, hangs up."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" * 512)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_cut_off_download_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutOffHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="cut off|stopped after"):
            download(f"http://127.0.0.1:{server.server_port}/c.tar.gz",
                     tmp_path / "dl" / "c.tar.gz", "0" * 64)
    finally:
        server.shutdown()
        server.server_close()
    assert list((tmp_path / "dl").iterdir()) == []


# ------------------------------------------------------------------------------ bad inputs
def test_checksum_mismatch_says_expected_and_actual(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "c.tar.gz", random_batches(10, 2))
    with pytest.raises(UserError) as info:
        _load(archive, "ab" * 32)
    assert "ab" * 32 in str(info.value) and sha256_file(archive) in str(info.value)
    assert "data.sha256" in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.path: .*nope.tar.gz does not exist"):
        load_cifar10(str(tmp_path / "nope.tar.gz"), URL, "0" * 64)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_imports_anything_else_does_not_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    batches = random_batches(10, 2)
    batches["data_batch_2"] = pickle.dumps({"data": Evil(marker)}, protocol=protocol)
    with pytest.raises(UserError, match=r"refusing to import (posix|os)\.system"):
        _load(write_tar(tmp_path / "c.tar.gz", batches))
    assert not marker.exists()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(("member", "message"), [
    (_member("cifar-10-batches-py/../../escaped"), "unsafe member"),
    (_member("/tmp/absolute"), "unsafe member"),
    (_member("cifar-10-batches-py/evil", tarfile.SYMTYPE, "../../../etc/passwd"), "is a link"),
    (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "/etc/passwd"), "is a link"),
    (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "not a regular file"),
])
def test_unsafe_tar_members_are_refused(tmp_path: Path, member: tarfile.TarInfo,
                                        message: str) -> None:
    archive = tar_with(tmp_path / "c.tar.gz", member, b"x" if member.isfile() else b"")
    with pytest.raises(UserError, match=message):
        _load(archive)


def test_truncated_or_corrupt_archive(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "c.tar.gz", random_batches(50, 10)).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    # the user vouched for this file's checksum: the archive itself is found wanting
    with pytest.raises(UserError, match="truncated or corrupt archive"):
        _load(cut)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08" + bytes(range(256)) * 8)
    with pytest.raises(UserError, match="truncated or corrupt archive"):
        _load(junk)


@pytest.mark.parametrize(("blob", "message"), [
    (batch(np.zeros((2, 3000), np.uint8), [0, 1]), r"expected uint8 \(N, 3072\)"),
    (batch(np.zeros((2, 3072), np.int32), [0, 1]), "int32"),
    (batch(np.zeros((2, 3072), np.uint8), [0, 10]), r"label value\(s\) 10 outside 0\.\.9"),
    (batch(np.zeros((2, 3072), np.uint8), [0, -1]), r"label value\(s\) -1 outside 0\.\.9"),
    (batch(np.zeros((2, 3072), np.uint8), [0]), "'labels' must be 2 integers"),
    (py2_batch_pickle({b"labels": [0]}), "missing 'data'"),
    (b"not a pickle at all", "corrupt pickle"),
])
def test_wrong_shapes_dtypes_and_labels(tmp_path: Path, blob: bytes, message: str) -> None:
    batches = random_batches(10, 2)
    batches["data_batch_3"] = blob
    with pytest.raises(UserError, match=message) as info:
        _load(write_tar(tmp_path / "c.tar.gz", batches))
    assert "data_batch_3" in str(info.value)


def test_archive_without_the_batches(tmp_path: Path) -> None:
    batches = random_batches(10, 2)
    del batches["test_batch"]
    with pytest.raises(UserError, match="no cifar-10-batches-py/test_batch"):
        _load(write_tar(tmp_path / "c.tar.gz", batches))


def test_a_local_archive_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    data = _load(write_tar(tmp_path / "c.tar.gz", random_batches(10, 2)))
    assert len(data.train_labels) == 10
