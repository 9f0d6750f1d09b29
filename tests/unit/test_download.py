"""Download against a local HTTP server on 127.0.0.1: success, md5, truncation + resume, refused, bad archives."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spleen_tools.cli.download import main
from spleen_tools.data.download import ARCHIVE_NAME, TASK_NAME, DownloadError, download_spleen, extract_archive

REPO = Path(__file__).resolve().parents[2]


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fake_task_tar() -> bytes:
    meta = {
        "name": "Spleen",
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}],
    }
    return _tar_bytes(
        {
            f"{TASK_NAME}/dataset.json": json.dumps(meta).encode(),
            f"{TASK_NAME}/imagesTr/spleen_2.nii.gz": b"image" * 2000,
            f"{TASK_NAME}/labelsTr/spleen_2.nii.gz": b"label" * 2000,
        }
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.payload; server.mode is 'full', 'truncate' (half the bytes, then close) or 'norange'."""

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        data: bytes = self.server.payload  # type: ignore[attr-defined]
        mode: str = self.server.mode  # type: ignore[attr-defined]
        self.server.ranges.append(self.headers.get("Range"))  # type: ignore[attr-defined]
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "truncate" else body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload = _fake_task_tar()  # type: ignore[attr-defined]
    srv.mode = "full"  # type: ignore[attr-defined]
    srv.ranges = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _url(srv: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{ARCHIVE_NAME}"


def _md5(srv: http.server.ThreadingHTTPServer) -> str:
    return hashlib.md5(srv.payload).hexdigest()  # type: ignore[attr-defined]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_success_and_skip(server, tmp_path: Path, capsys) -> None:
    assert main(["--dest", str(tmp_path), "--url", _url(server), "--md5", _md5(server)]) == 0
    task = tmp_path / TASK_NAME
    assert (task / "dataset.json").is_file() and (task / "imagesTr" / "spleen_2.nii.gz").is_file()
    assert not (tmp_path / ARCHIVE_NAME).exists() and not (tmp_path / f"{ARCHIVE_NAME}.part").exists()
    assert [p.name for p in tmp_path.iterdir()] == [TASK_NAME]  # no temporary folders left
    # A second run finds the complete dataset and does not touch the network.
    capsys.readouterr()
    assert main(["--dest", str(tmp_path), "--url", f"http://127.0.0.1:{_closed_port()}/x", "--md5", "0"]) == 0
    assert "skipping" in capsys.readouterr().out


def test_keep_archive_and_env_default(server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPLEEN_DATA_ROOT", str(tmp_path / "root"))
    assert main(["--url", _url(server), "--md5", _md5(server), "--keep-archive"]) == 0
    assert (tmp_path / "root" / ARCHIVE_NAME).is_file()
    assert (tmp_path / "root" / TASK_NAME / "dataset.json").is_file()


def test_wrong_md5_deletes_file(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="md5 mismatch.*deleted the bad file"):
        download_spleen(tmp_path, url=_url(server), md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_keeps_part_and_resumes(server, tmp_path: Path) -> None:
    server.mode = "truncate"
    with pytest.raises(DownloadError, match="stopped early.*rerun the same command to resume"):
        download_spleen(tmp_path, url=_url(server), md5=_md5(server), progress=False)
    part = tmp_path / f"{ARCHIVE_NAME}.part"
    half = len(server.payload) // 2
    assert part.stat().st_size == half
    assert not (tmp_path / TASK_NAME).exists()
    server.mode = "full"
    assert download_spleen(tmp_path, url=_url(server), md5=_md5(server), progress=False) == tmp_path / TASK_NAME
    assert server.ranges[-1] == f"bytes={half}-"  # resumed, not restarted
    assert not part.exists()


def test_resume_restarts_when_server_ignores_range(server, tmp_path: Path) -> None:
    (tmp_path / f"{ARCHIVE_NAME}.part").write_bytes(b"garbage that is not the start of the file")
    server.mode = "norange"
    assert (download_spleen(tmp_path, url=_url(server), md5=_md5(server), progress=False) / "dataset.json").is_file()


def test_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/{ARCHIVE_NAME}"
    with pytest.raises(DownloadError, match="cannot reach .*--url"):
        download_spleen(tmp_path, url=url, md5="0" * 32, progress=False, timeout=5)


def test_http_error(server, tmp_path: Path) -> None:
    class _NotFound(_Handler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_error(404)

    server.RequestHandlerClass = _NotFound
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_spleen(tmp_path, url=_url(server), md5="0" * 32, progress=False)


def test_cli_error_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    code = main(["--dest", str(tmp_path), "--url", f"http://127.0.0.1:{_closed_port()}/x.tar", "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_script_from_checkout(tmp_path: Path) -> None:
    """download_spleen_dataset.py runs from the repo root without installation; errors stay one line."""
    url = f"http://127.0.0.1:{_closed_port()}/x.tar"
    proc = subprocess.run(
        [sys.executable, "download_spleen_dataset.py", "--dest", str(tmp_path), "--url", url, "--timeout", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: cannot reach")


@pytest.mark.parametrize(
    "members",
    [
        {"../evil.txt": b"x", f"{TASK_NAME}/dataset.json": b"{}"},
        {"/tmp/evil.txt": b"x"},
    ],
)
def test_extract_rejects_escaping_members(tmp_path: Path, members: dict[str, bytes]) -> None:
    archive = tmp_path / ARCHIVE_NAME
    archive.write_bytes(_tar_bytes(members))
    with pytest.raises(DownloadError, match="cannot extract"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind


def test_extract_rejects_symlink_out(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(f"{TASK_NAME}/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tar.addfile(info)
    archive = tmp_path / ARCHIVE_NAME
    archive.write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="cannot extract"):
        extract_archive(archive, tmp_path / "out")


def test_extract_bad_archive_and_wrong_content(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DownloadError, match="cannot extract"):
        extract_archive(bad, tmp_path / "out")
    other = tmp_path / "other.tar"
    other.write_bytes(_tar_bytes({"Task01_BrainTumour/dataset.json": b"{}"}))
    with pytest.raises(DownloadError, match="has no Task09_Spleen/dataset.json"):
        extract_archive(other, tmp_path / "out")
    assert not (tmp_path / "out" / TASK_NAME).exists()


def test_cli_synthetic(tmp_path: Path, capsys) -> None:
    args = ["--dest", str(tmp_path), "--synthetic", "--num-train", "2", "--num-test", "1", "--shape", "24", "24", "8"]
    assert main(args) == 0
    meta = json.loads((tmp_path / TASK_NAME / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    capsys.readouterr()
    assert main(args) == 0
    assert "skipping" in capsys.readouterr().out
