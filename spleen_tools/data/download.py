"""Download and extract MSD ``Task09_Spleen`` with a hash check, resume and safe, atomic extraction.

Steps: stream to ``<dest>/Task09_Spleen.tar.part`` (resumed with an HTTP Range request when a ``.part`` exists
and the server honours it), check the size against Content-Length, verify the md5, rename to
``Task09_Spleen.tar``, extract into a temporary folder and rename it to ``<dest>/Task09_Spleen``.
Every failure raises :class:`DownloadError` with a one-line message that names the fix.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
MSD_MD5 = "410d4a301da4e5b2f6f86ec3ddba524e"  # the hash MONAI's DecathlonDataset uses for this file
TASK_NAME = "Task09_Spleen"
ARCHIVE_NAME = "Task09_Spleen.tar"
DATA_ROOT_ENV = "SPLEEN_DATA_ROOT"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or extraction failure; the message says what to do about it."""


def default_data_root() -> Path:
    """``$SPLEEN_DATA_ROOT`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "data")


def dataset_is_complete(task_dir: str | Path) -> bool:
    """True when ``task_dir`` has a dataset.json and a non-empty imagesTr folder."""
    task_dir = Path(task_dir)
    images = task_dir / "imagesTr"
    return (task_dir / "dataset.json").is_file() and images.is_dir() and any(images.iterdir())


def md5sum(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """Open ``url``, asking for bytes from ``offset`` on; network and HTTP failures become DownloadError."""
    headers = {"User-Agent": "spleen-fl-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the server cannot continue our .part: the caller restarts
            raise
        raise DownloadError(
            f"server answered HTTP {e.code} {e.reason} for {url}; check the URL or pass a mirror with --url"
        ) from e
    except urllib.error.URLError as e:
        raise DownloadError(
            f"cannot reach {url} ({e.reason}); check the network or proxy, or pass a reachable mirror with --url"
        ) from e
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot reach {url} ({e}); check the network, then rerun") from e


def download_file(url: str, dest: str | Path, md5: str, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial download; verify md5.

    An existing ``dest`` with the right md5 is reused. On a size mismatch the ``.part`` file is kept so that
    a rerun resumes; on an md5 mismatch it is deleted.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    md5 = md5.lower()
    if dest.is_file():
        if md5sum(dest) == md5:
            log.info("%s already downloaded (md5 ok)", dest)
            return dest
        log.info("%s has the wrong md5; deleting it and downloading again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)

    offset = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError:  # 416: the .part does not fit the remote file; start over
        log.info("server cannot continue %s; starting the download again", part)
        part.unlink(missing_ok=True)
        offset = 0
        resp = _open(url, 0, timeout)

    with resp:
        if offset and resp.status == 206:
            start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):  # not the range we asked for: cannot append safely
                part.unlink()
                raise DownloadError(f"server sent an unexpected range for {url}; deleted {part}, rerun to start over")
            log.info("resuming %s from byte %d", part, offset)
            mode = "ab"
        else:
            if offset:
                log.info("server does not support resuming; starting %s again", part)
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        read_error: Exception | None = None
        with (
            open(part, mode) as f,
            tqdm(
                total=expected,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None if progress else True,  # None: only on a terminal
            ) as bar,
        ):
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                read_error = e  # keep what arrived; the size check below reports it

    size = part.stat().st_size
    if (expected is not None and size != expected) or (expected is None and read_error is not None):
        want = f"{expected} bytes" if expected is not None else "the full file"
        why = f" ({read_error})" if read_error else ""
        raise DownloadError(
            f"download of {url} stopped early{why}: got {size} of {want}; "
            f"{part} was kept, rerun the same command to resume"
        )
    actual = md5sum(part)
    if actual != md5:
        part.unlink()
        raise DownloadError(
            f"md5 mismatch for {url}: expected {md5}, got {actual}; deleted the bad file, "
            "rerun to download again or check that --url and --md5 belong together"
        )
    os.replace(part, dest)  # atomic: a final .tar always has a verified md5
    return dest


def _check_members(tar: tarfile.TarFile, root: Path) -> None:
    """Reject members that would land outside ``root`` (absolute paths, ``..``, links pointing out)."""
    root = root.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not target.is_relative_to(root) or os.path.isabs(member.name):
            raise tarfile.OutsideDestinationError(member, str(target))
        if member.issym() or member.islnk():
            base = target.parent if member.issym() else root
            link = (base / member.linkname).resolve()
            if os.path.isabs(member.linkname) or not link.is_relative_to(root):
                raise tarfile.LinkOutsideDestinationError(member, str(link))


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Extract ``archive`` (containing ``Task09_Spleen/``) into ``dest`` safely; return ``dest/Task09_Spleen``.

    Extraction goes to a temporary folder that is renamed when complete, so an interrupted run never
    leaves a folder that looks finished.
    """
    archive, dest = Path(archive), Path(dest)
    task_dir = dest / TASK_NAME
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TASK_NAME}.extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive) as tar:
                _check_members(tar, tmp)
                tar.extractall(tmp, filter="data")  # the stdlib's own guard on top of ours
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DownloadError(
                f"cannot extract {archive} ({e}); delete it and rerun, or check that --url and --md5 are right"
            ) from e
        extracted = tmp / TASK_NAME
        if not dataset_is_complete(extracted):
            raise DownloadError(
                f"{archive} has no {TASK_NAME}/dataset.json with imagesTr/; check that --url points to {ARCHIVE_NAME}"
            )
        if task_dir.exists():  # an incomplete leftover (complete ones are skipped before downloading)
            shutil.rmtree(task_dir)
        extracted.rename(task_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return task_dir


def download_spleen(
    dest: str | Path | None = None,
    url: str = MSD_URL,
    md5: str = MSD_MD5,
    keep_archive: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Make ``<dest>/Task09_Spleen`` from the MSD archive (skipped if already complete); return its path."""
    dest = Path(dest) if dest is not None else default_data_root()
    task_dir = dest / TASK_NAME
    if dataset_is_complete(task_dir):
        log.info("%s already exists and is complete; skipping the download", task_dir)
        return task_dir
    archive = download_file(url, dest / ARCHIVE_NAME, md5, timeout=timeout, progress=progress)
    log.info("extracting %s", archive)
    task_dir = extract_archive(archive, dest)
    if not keep_archive:
        archive.unlink()
    log.info("dataset ready in %s", task_dir)
    return task_dir
