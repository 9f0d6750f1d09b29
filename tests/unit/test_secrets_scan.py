"""The secrets scan on real material: RSA keys and certificates as nvflare provision writes them, a real TenSEAL
CKKS context from NVFlare's HEBuilder, laid out as startup kits; then planted copies that must be found and public
files that must not be.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
import tenseal
import zstandard
from cryptography.hazmat.primitives import serialization
from nvflare.lighter.impl.he import HEBuilder
from nvflare.lighter.utils import generate_keys
from secure_kits import PARTICIPANTS, PROJECT, provisioned_kits

from spleen_tools.cli.scan_secrets import main
from spleen_tools.run import scan_decoders
from spleen_tools.run.kit_secrets import Secret, known_secrets
from spleen_tools.run.secrets_scan import CHUNK_SIZE, MAX_DEPTH, Finding, scan


def _pem_body(pem: bytes) -> str:
    """The base64 lines of a PEM block, without its BEGIN/END lines."""
    return "\n".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    """<workspace>/secure_project/{prod_00/<participant>/startup, state/cert.json} as nvflare provision writes it."""
    return provisioned_kits(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def secrets(kits) -> list[Secret]:
    return known_secrets([kits])


def _startup(kits: Path, name: str) -> Path:
    return kits / PROJECT / "prod_00" / name / "startup"


def _secret_key(kits: Path) -> bytes:
    """The HE secret key as SEAL writes it: ctx.secret_key().data.save(path)."""
    ctx = tenseal.context_from((_startup(kits, "site-1") / "client_context.tenseal").read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        ctx.secret_key().data.save(f"{tmp}/sk")
        return Path(tmp, "sk").read_bytes()


@pytest.fixture
def run_dir(tmp_path, kits) -> Path:
    """A clean run: logs, an MLflow store, a zipped job, a model, and the public kit files copied in."""
    run = tmp_path / "run"
    (run / "mlruns" / "1" / "abc" / "metrics").mkdir(parents=True)
    (run / "mlruns" / "1" / "abc" / "metrics" / "val_dice").write_text("1700000000 0.91 3\n")
    (run / "mlruns" / "1" / "abc" / "meta.yaml").write_text("run_id: abc\nstatus: 3\n")
    (run / "logs").mkdir()
    (run / "logs" / "server.log").write_text("INFO round 3 aggregated 2 encrypted updates\n" * 2000)
    (run / "model.bin").write_bytes(os.urandom(CHUNK_SIZE + 4096))  # crosses a chunk border
    server, site = _startup(kits, "localhost"), _startup(kits, "site-1")
    for public in (server / "server_context.tenseal", server / "server.crt", site / "client.crt", site / "rootCA.pem"):
        shutil.copy(public, run / "logs" / public.name)
    with zipfile.ZipFile(run / "job.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("job/meta.json", json.dumps({"name": "spleen_he"}))
        zf.writestr("job/app/config/config_fed_server.json", json.dumps({"format_version": 2}))
        zf.write(server / "server_context.tenseal", "job/app/server_context.tenseal")
    return run


def _whats(report) -> list[str]:
    return [f.what for f in report.findings]


def test_known_secrets_are_the_keys_and_the_client_context(kits, secrets):
    names = [s.name for s in secrets]
    for name, base in PARTICIPANTS.items():
        assert any(n.startswith(f"{_startup(kits, name) / base}.key: PEM private key") for n in names)
    assert any("cert.json: PEM private key (root_pri_key)" in n for n in names)
    (he,) = [s for s in secrets if "TenSEAL" in s.name]
    assert {p.parent.parent.name for p in he.sources} == {"site-1", "site-2"}  # one context, provisioned twice
    assert not any("server_context" in n or ".crt" in n for n in names)
    assert len(secrets) == 1 + len(PARTICIPANTS) + 1  # cert.json copies of the site keys merged into the .key ones
    assert all(len(s.needles) >= 8 for s in secrets)


def test_needles_are_specific_to_their_secret(tmp_path, secrets):
    """Headers, algorithm ids and public numbers are shared: other keys and contexts must not match any needle."""
    for i in range(4):
        key, _ = generate_keys()
        for name, fmt in (
            ("pkcs8", serialization.PrivateFormat.PKCS8),
            ("rsa", serialization.PrivateFormat.TraditionalOpenSSL),
        ):
            pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
            der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
            (tmp_path / f"{i}-{name}.txt").write_bytes(pem.replace(b"-----BEGIN", b"-----START"))  # no marker
            (tmp_path / f"{i}-{name}.der").write_bytes(der)
    he = HEBuilder()
    he.initialize(None, None)
    (tmp_path / "other.tenseal").write_bytes(he.get_serialized_context(is_client=True))
    assert _whats(scan([tmp_path], secrets)) == ["TenSEAL context with secret key"]


def test_clean_run_dir_has_no_findings(run_dir, secrets):
    report = scan([run_dir], secrets)
    assert report.clean, report.findings + report.unchecked
    assert report.files == 9 and report.members == 3 and report.bytes > CHUNK_SIZE


def test_public_server_context_is_not_a_finding(tmp_path, kits, secrets):
    shutil.copy(_startup(kits, "localhost") / "server_context.tenseal", tmp_path / "server_context.tenseal")
    shutil.copy(_startup(kits, "localhost") / "server_context.tenseal", tmp_path / "ctx.bin")
    assert scan([tmp_path], secrets).findings == []


def test_planted_key_file_is_found(run_dir, kits, secrets):
    shutil.copy(_startup(kits, "admin@nvidia.com") / "client.key", run_dir / "logs" / "debug.txt")
    report = scan([run_dir], secrets)
    assert {f.file for f in report.findings} == {str(run_dir / "logs" / "debug.txt")}
    assert "PEM private key" in _whats(report)
    assert any(w.startswith("copy of ") and "admin@nvidia.com" in w for w in _whats(report))


def test_unknown_pem_key_is_found_by_its_marker(tmp_path, secrets):
    key, _ = generate_keys()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "notes.md").write_bytes(b"# notes\n" + pem)
    (finding,) = scan([tmp_path], secrets).findings
    assert finding.what == "PEM private key" and "BEGIN PRIVATE KEY" in finding.detail


@pytest.mark.parametrize("markers", [True, False])
def test_pem_in_json_with_escaped_newlines_is_found(tmp_path, kits, secrets, markers):
    pem = (_startup(kits, "site-2") / "client.key").read_text()
    text = pem if markers else _pem_body(pem.encode())  # no markers: only the body's chunks can find it
    (tmp_path / "params.json").write_text(json.dumps({"tls": {"key": text}}))
    assert "\\n" in (tmp_path / "params.json").read_text()
    whats = _whats(scan([tmp_path], secrets))
    assert ("PEM private key" in whats) == markers
    assert any(w.startswith(f"copy of {_startup(kits, 'site-2')}/client.key") for w in whats)


def test_rewrapped_pem_body_and_der_are_found(tmp_path, kits, secrets):
    body = _pem_body((_startup(kits, "localhost") / "server.key").read_bytes()).replace("\n", "")
    (tmp_path / "wrapped.txt").write_text("\n".join(body[i : i + 76] for i in range(0, len(body), 76)))
    (tmp_path / "blob.bin").write_bytes(os.urandom(1001) + base64.b64decode(body) + os.urandom(999))
    report = scan([tmp_path], secrets)
    assert sorted(Path(f.file).name for f in report.findings) == ["blob.bin", "wrapped.txt"]
    assert all("server.key" in f.what for f in report.findings)


def test_root_ca_key_from_cert_json_is_found(tmp_path, kits, secrets):
    state = json.loads((kits / PROJECT / "state" / "cert.json").read_text())
    (tmp_path / "dump.txt").write_text(_pem_body(state["root_pri_key"].encode()))
    (finding,) = scan([tmp_path], secrets).findings
    assert "root_pri_key" in finding.what


def test_client_context_under_another_name_is_found(run_dir, kits, secrets):
    shutil.copy(_startup(kits, "site-1") / "client_context.tenseal", run_dir / "mlruns" / "1" / "abc" / "ctx.bin")
    whats = _whats(scan([run_dir], secrets))
    assert "TenSEAL context with secret key" in whats
    assert any(w.startswith("copy of ") and "client_context.tenseal" in w for w in whats)


def _uncompressed(seal: bytes) -> bytes:
    """The same SEAL object saved with compr_mode none: header with mode 0, then the plain body."""
    import zstandard

    magic, hsize, major, minor, compr, reserved, _ = struct.unpack_from("<HBBBBHQ", seal)
    assert compr == 2  # zstd, SEAL's default
    body = zstandard.ZstdDecompressor().decompressobj().decompress(seal[hsize:])
    return struct.pack("<HBBBBHQ", magic, hsize, major, minor, 0, reserved, hsize + len(body)) + body


@pytest.mark.parametrize("form", ["as saved", "uncompressed"])
def test_secret_key_inside_a_binary_across_a_chunk_border_is_found(tmp_path, kits, secrets, form):
    key = _secret_key(kits) if form == "as saved" else _uncompressed(_secret_key(kits))
    at = CHUNK_SIZE - len(key) // 2 - 13  # the key crosses the border, at an odd offset
    (tmp_path / "update.bin").write_bytes(os.urandom(at) + key + os.urandom(4096))
    (finding,) = scan([tmp_path], secrets).findings
    assert "client_context.tenseal: TenSEAL context with secret key" in finding.what


@pytest.mark.parametrize("secret_name", ["client.key", "client_context.tenseal"])
def test_a_single_needle_across_a_chunk_border_is_found(tmp_path, secrets, secret_name):
    """Each needle (bytes, hex, base64 at each alignment) alone in a file of its own, across the first border."""
    secret = next(s for s in secrets if secret_name in s.name)
    for n, needle in enumerate(secret.needles):
        data = bytearray(os.urandom(3 * 4096))
        data[4096 - 7 : 4096 - 7 + len(needle)] = needle
        (tmp_path / f"piece{n:03d}.bin").write_bytes(bytes(data))
    findings = scan([tmp_path], secrets, chunk_size=4096).findings
    assert sorted(f.file for f in findings) == [str(tmp_path / f"piece{n:03d}.bin") for n in range(len(secret.needles))]
    assert {(f.what, f.detail) for f in findings} == {(f"copy of {secret.name}", f"at byte {4096 - 7}")}


def test_secrets_inside_zips_are_found(tmp_path, kits, secrets):
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(_startup(kits, "site-1") / "client_context.tenseal", "app/custom/ctx.tenseal")
    with zipfile.ZipFile(tmp_path / "job.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("job/startup/client.key", (_startup(kits, "site-1") / "client.key").read_bytes())
        zf.write(inner, "job/inner.zip")
    inner.unlink()
    report = scan([tmp_path], secrets)
    zipped = str(tmp_path / "job.zip")
    by_file = {(f.file, f.what) for f in report.findings}
    assert (f"{zipped}!job/startup/client.key", "PEM private key") in by_file
    assert (f"{zipped}!job/inner.zip!app/custom/ctx.tenseal", "TenSEAL context with secret key") in by_file
    # zstd output does not deflate: the context's bytes also show through both zips, as copies
    assert all(file.startswith(zipped) for file, _ in by_file)
    assert report.files == 1 and report.members == 3


def test_symlinks_are_not_followed_and_kit_files_are_not_findings(tmp_path, kits, secrets):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "key").symlink_to(_startup(kits, "site-1") / "client.key")
    (tmp_path / "run" / "startup").symlink_to(_startup(kits, "site-1"), target_is_directory=True)
    assert scan([tmp_path / "run"], secrets).files == 0
    log = kits / PROJECT / "prod_00" / "site-1" / "log.txt"  # logs live next to the kit
    log.write_text("ok\n")
    report = scan([kits], secrets)
    assert report.clean and report.files > 0 and str(log) not in report.kit_files
    assert len(report.kit_files) == len(PARTICIPANTS) + 2 + 1  # keys, two client contexts, cert.json
    log.write_text((_startup(kits, "site-1") / "client.key").read_text())
    assert {f.file for f in scan([kits], secrets).findings} == {str(log)}
    log.unlink()


def test_a_large_file_is_read_in_chunks(tmp_path, secrets):
    """Its speed: benchmarks/secrets_scan_speed.py."""
    (tmp_path / "big.bin").write_bytes(os.urandom(64 << 20))
    report = scan([tmp_path], secrets)
    assert report.clean and report.bytes == 64 << 20


# --- re-encodings, archives, links ----------------------------------------------------------------------------------


def _key_pem(kits: Path) -> bytes:
    return (_startup(kits, "site-1") / "client.key").read_bytes()


def _key_der(kits: Path) -> bytes:
    return base64.b64decode(_pem_body(_key_pem(kits)))


def _copies(report, kits: Path) -> set[str]:
    """The files (or archive members) found to hold a copy of site-1's client.key."""
    name = f"copy of {_startup(kits, 'site-1') / 'client.key'}: "
    return {f.file for f in report.findings if f.what.startswith(name)}


def _tar(path: Path, mode: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstandard.compress}
TAR_MODES = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.bz2": "w:bz2", ".tar.xz": "w:xz"}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_pem_inside_a_compressed_file_is_found(tmp_path, kits, secrets, suffix):
    path = tmp_path / f"client.key{suffix}"
    path.write_bytes(COMPRESSORS[suffix](_key_pem(kits)))
    report = scan([tmp_path], secrets)
    inner = f"{path}!client.key"
    assert (inner, "PEM private key") in {(f.file, f.what) for f in report.findings}
    assert _copies(report, kits) == {inner} and not report.unchecked and report.members == 1


@pytest.mark.parametrize("suffix", list(TAR_MODES))
def test_secrets_inside_tar_archives_are_found_by_member(tmp_path, kits, secrets, suffix):
    path = tmp_path / f"job{suffix}"
    context = (_startup(kits, "site-1") / "client_context.tenseal").read_bytes()
    files = {"job/logs/log.txt": b"round 1 done\n" * 1000, "job/startup/client.key": _key_pem(kits)}
    _tar(path, TAR_MODES[suffix], {**files, "job/app/ctx.bin": context})
    report = scan([tmp_path], secrets)
    tar = str(path) if suffix == ".tar" else f"{path}!job.tar"
    found = {(f.file, f.what) for f in report.findings}
    assert (f"{tar}!job/startup/client.key", "PEM private key") in found
    assert (f"{tar}!job/app/ctx.bin", "TenSEAL context with secret key") in found
    assert f"{tar}!job/startup/client.key" in _copies(report, kits)
    assert not any(f.file.endswith("log.txt") for f in report.findings)
    assert not report.unchecked and report.members == 3 + (suffix != ".tar")


def test_archives_inside_archives_are_opened(tmp_path, kits, secrets):
    job = io.BytesIO()
    with zipfile.ZipFile(job, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("keys/client.key.gz", gzip.compress(_key_pem(kits)))
    _tar(tmp_path / "export.tar.gz", "w:gz", {"bundle/job.zip": job.getvalue()})
    report = scan([tmp_path], secrets)
    leaf = f"{tmp_path / 'export.tar.gz'}!export.tar!bundle/job.zip!keys/client.key.gz!client.key"
    assert _copies(report, kits) == {leaf} and not report.unchecked


def test_archives_nested_too_deep_fail_the_scan(tmp_path, secrets):
    data = b"INFO nothing to see\n"
    for _ in range(MAX_DEPTH + 1):
        data = gzip.compress(data)
    (tmp_path / "deep.gz").write_bytes(data)
    (finding,) = scan([tmp_path], secrets).unchecked
    assert finding.what == "not fully scanned" and f"nested {MAX_DEPTH} deep" in finding.detail


@pytest.mark.parametrize("form", ["lower", "upper", "openssl -text"])
def test_der_as_hex_is_found(tmp_path, kits, secrets, form):
    der = _key_der(kits)
    if form == "openssl -text":  # the private exponent as `openssl rsa -text` prints it
        d = serialization.load_der_private_key(der, None).private_numbers().d
        octets = [f"{b:02x}" for b in b"\0" + d.to_bytes((d.bit_length() + 7) // 8, "big")]
        text = "privateExponent:\n" + ":\n".join("    " + ":".join(octets[i : i + 15]) for i in range(0, 257, 15))
    else:
        text = der.hex() if form == "lower" else der.hex().upper()
    (tmp_path / "dump.txt").write_text(text)
    assert _copies(scan([tmp_path], secrets), kits) == {str(tmp_path / "dump.txt")}


def test_base64_at_every_byte_alignment_is_found(tmp_path, kits, secrets):
    """The key's bytes shifted by 0, 1 or 2 bytes in what is encoded give three different base64 texts."""
    for shift in range(3):
        (tmp_path / f"blob{shift}.b64").write_bytes(base64.b64encode(os.urandom(shift) + _key_der(kits) + b"\0" * 7))
    report = scan([tmp_path], secrets)
    assert _copies(report, kits) == {str(tmp_path / f"blob{shift}.b64") for shift in range(3)}


@pytest.mark.parametrize("width", [16, 20, 24, "json 16", "crlf 28"])
def test_base64_wrapped_at_any_width_is_found(tmp_path, kits, secrets, width):
    body = _pem_body(_key_pem(kits)).replace("\n", "")
    columns = int(str(width).split()[-1])
    text = "\n".join(body[i : i + columns] for i in range(0, len(body), columns))
    if str(width).startswith("json"):
        text = json.dumps({"key": text})  # escaped line breaks
    elif str(width).startswith("crlf"):
        text = text.replace("\n", "\r\n  ")
    (tmp_path / "wrapped.txt").write_text(text)
    assert _copies(scan([tmp_path], secrets), kits) == {str(tmp_path / "wrapped.txt")}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_pem_in_utf16_text_is_found(tmp_path, kits, secrets, encoding):
    (tmp_path / "notes.txt").write_bytes(("key:\r\n" + _key_pem(kits).decode()).encode(encoding))
    report = scan([tmp_path], secrets)
    assert _copies(report, kits) == {str(tmp_path / "notes.txt")}
    (marker,) = [f for f in report.findings if f.what == "PEM private key"]
    assert marker.detail.startswith("-----BEGIN RSA PRIVATE KEY----- at byte ")


def test_a_hard_link_to_a_kit_key_is_a_finding(tmp_path, kits, secrets):
    key = _startup(kits, "site-1") / "client.key"
    (tmp_path / "run").mkdir()
    os.link(key, tmp_path / "run" / "saved.key")
    report = scan([tmp_path / "run"], secrets)
    assert _copies(report, kits) == {str(tmp_path / "run" / "saved.key")} and report.kit_files == []
    link = key.parent.parent / "backup.key"  # next to the kit, scanned with it: only the provisioned path is skipped
    os.link(key, link)
    try:
        report = scan([kits], secrets)
        assert {f.file for f in report.findings} == {str(link)} and str(key) in report.kit_files
    finally:
        link.unlink()


# --- what an archive may unpack ---------------------------------------------------------------------------------


def _gzip_bomb(path: Path, mib: int) -> None:
    """``mib`` MiB of zeros from a file of about 1 KB per MiB: gzip members, concatenated."""
    path.write_bytes(gzip.compress(bytes(1 << 20), compresslevel=9) * mib)


def test_a_decompression_bomb_stops_at_the_cap_and_fails_the_scan(tmp_path, secrets):
    _gzip_bomb(tmp_path / "bomb.gz", 64)
    report = scan([tmp_path], secrets, member_cap=8 << 20)
    cap = "unpacks to more than 8 MiB; unpack it and scan the files, or raise --max-unpacked"
    assert report.unchecked == [Finding(f"{tmp_path / 'bomb.gz'}!bomb", "not fully scanned", cap)]
    assert report.unpacked <= 8 << 20 and report.files == 1


def test_what_one_file_unpacks_in_all_is_capped(tmp_path, secrets):
    _tar(tmp_path / "many.tar.gz", "w:gz", {f"part{i}.bin": bytes(4 << 20) for i in range(8)})
    report = scan([tmp_path], secrets, member_cap=64 << 20, file_cap=16 << 20)
    assert [(f.file, f.what) for f in report.unchecked] == [(str(tmp_path / "many.tar.gz"), "not fully scanned")]
    assert "more than 16 MiB" in report.unchecked[0].detail and report.unpacked <= 16 << 20


def test_a_zip_bomb_member_is_capped_and_the_others_read(tmp_path, kits, secrets):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(64 << 20))
        zf.writestr("later/client.key", _key_pem(kits))
    report = scan([tmp_path], secrets, member_cap=8 << 20)
    assert [(f.file, f.what) for f in report.unchecked] == [(f"{tmp_path / 'bomb.zip'}!zeros.bin", "not fully scanned")]
    assert f"{tmp_path / 'bomb.zip'}!later/client.key" in _copies(report, kits)


def test_a_tar_header_that_claims_megabytes_is_refused(tmp_path, secrets):
    info = tarfile.TarInfo("a.txt")
    info.pax_headers = {"comment": "x" * (2 << 20)}  # tarfile would read it whole, whatever size it claims
    with tarfile.open(tmp_path / "odd.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    (finding,) = scan([tmp_path], secrets).unchecked
    assert finding.file == str(tmp_path / "odd.tar") and "extended header of" in finding.detail


def test_archives_of_too_many_members_fail_the_scan(tmp_path, secrets, monkeypatch):
    """A tar of 1 GiB holds 2 million headers, a zip's directory becomes an object per entry: both are capped."""
    monkeypatch.setattr(scan_decoders, "MAX_MEMBERS", 10)
    _tar(tmp_path / "many.tar.gz", "w:gz", {f"f{i}.txt": b"x" for i in range(11)})
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for i in range(11):
            zf.writestr(f"f{i}.txt", b"x")
    report = scan([tmp_path], secrets)
    tar, zipped = f"{tmp_path / 'many.tar.gz'}!many.tar", str(tmp_path / "many.zip")
    assert sorted(f.file for f in report.unchecked) == [tar, zipped]
    assert {f.what for f in report.unchecked} == {"not fully scanned"}


def test_a_zip64_directory_is_read_from_its_zip64_end_record(tmp_path):
    with zipfile.ZipFile(tmp_path / "big.zip", "w") as zf:
        for i in range(0x10000 + 5):  # past what the classic end record can count
            zf.writestr(str(i), b"")
    with (tmp_path / "big.zip").open("rb") as f:
        entries, size = scan_decoders.zip_directory(f)
    assert entries == 0x10005 and size > 0x10000 * 46


@pytest.mark.parametrize("how", ["appended", "bad header"])
def test_data_after_the_end_of_a_tar_fails_the_scan(tmp_path, secrets, how):
    path = tmp_path / "job.tar"
    _tar(path, "w", {"a.txt": b"fine\n", "b.txt": b"hidden behind a header tarfile stops at\n"})
    if how == "appended":
        with path.open("ab") as f:
            f.write(gzip.compress(b"not in any member"))
    else:
        data = bytearray(path.read_bytes())
        data[1024 + 148 : 1024 + 156] = b"0000000\0"  # the second header's checksum
        path.write_bytes(bytes(data))
    (finding,) = scan([tmp_path], secrets).unchecked
    assert (finding.file, finding.detail) == (str(path), "tar: data after the end of the tar archive")


def test_escaped_line_breaks_split_by_a_chunk_border_are_found(tmp_path, kits, secrets):
    """The backslash of a JSON-escaped line break ends one chunk, its n starts the next."""
    body = _pem_body(_key_pem(kits)).replace("\n", "")
    text = json.dumps({"key": "\n".join(body[i : i + 16] for i in range(0, len(body), 16))})
    (tmp_path / "params.json").write_text(text)
    escapes = [i for i in range(300, len(text)) if text[i : i + 2] == "\\n"][:3]
    for backslash in escapes:
        report = scan([tmp_path], secrets, chunk_size=backslash + 1)
        assert _copies(report, kits) == {str(tmp_path / "params.json")}, backslash


@pytest.mark.parametrize("chunk_size", [300, 4096])
def test_utf16_copies_across_chunk_borders_are_found(tmp_path, kits, secrets, chunk_size):
    prefix = os.urandom(4090)
    (tmp_path / "dump.bin").write_bytes(prefix + _key_pem(kits).decode().encode("utf-16-le") + os.urandom(999))
    report = scan([tmp_path], secrets, chunk_size=chunk_size)
    assert _copies(report, kits) == {str(tmp_path / "dump.bin")}
    (marker,) = [f for f in report.findings if f.what == "PEM private key"]
    assert marker.detail == f"-----BEGIN RSA PRIVATE KEY----- at byte {len(prefix)}"


def test_clean_archives_and_encodings_pass(run_dir, kits, secrets):
    """Public kit files and logs, compressed, archived, hex-dumped and in UTF-16: no finding, nothing unchecked."""
    server = _startup(kits, "localhost")
    public = {f"startup/{p.name}": p.read_bytes() for p in server.iterdir() if p.suffix != ".key"}
    log = (run_dir / "logs" / "server.log").read_bytes()
    _tar(run_dir / "export.tar.gz", "w:gz", {"logs/server.log": log, **public})
    for suffix, compress in COMPRESSORS.items():
        (run_dir / "logs" / f"old.log{suffix}").write_bytes(compress(log))
    (run_dir / "logs" / "two.log.xz").write_bytes(lzma.compress(log) + b"\0" * 4 + lzma.compress(log))  # padding
    (run_dir / "logs" / "utf16.txt").write_bytes(log.decode().encode("utf-16"))
    (run_dir / "logs" / "certs.hex").write_text("".join(p.hex() for p in public.values()))
    wrapped = base64.b64encode(b"".join(public.values())).decode()
    (run_dir / "logs" / "certs.b64").write_text("\n".join(wrapped[i : i + 20] for i in range(0, len(wrapped), 20)))
    report = scan([run_dir], secrets)
    assert report.clean, report.findings + report.unchecked
    assert report.members == 3 + 1 + len(public) + 1 + len(COMPRESSORS) + 1  # job.zip, the tar, its members, logs


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_clean_exits_0(run_dir, kits, tmp_path, capsys):
    out = tmp_path / "scan.json"
    assert main([str(run_dir), "--kits", str(kits), "--json", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(": no secrets found")
    doc = json.loads(out.read_text())
    assert doc["findings"] == [] and doc["files"] == 9


def test_cli_findings_exit_1_one_line_each(run_dir, kits, tmp_path, capsys):
    shutil.copy(_startup(kits, "site-1") / "client.key", run_dir / "logs" / "a.pem")
    shutil.copy(_startup(kits, "site-1") / "client_context.tenseal", run_dir / "b.tenseal")
    out = tmp_path / "scan.json"
    assert main([str(run_dir), "--kits", str(kits), "--json", str(out)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(json.loads(out.read_text())["findings"]) == 4
    assert all(line.startswith(f"error: {run_dir}/") for line in lines)
    assert any(line.startswith(f"error: {run_dir / 'b.tenseal'}: TenSEAL context with secret key") for line in lines)


def test_cli_a_bomb_fails_with_one_line_naming_the_file(kits, tmp_path, capsys):
    _gzip_bomb(tmp_path / "run.log.gz", 16)
    assert main([str(tmp_path), "--kits", str(kits), "--max-unpacked", "4"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    fix = "unpack it and scan the files, or raise --max-unpacked"
    assert line == f"error: {tmp_path / 'run.log.gz'}!run.log: not fully scanned (unpacks to more than 4 MiB; {fix})"


def test_cli_missing_root_exits_2(kits, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--kits", str(kits)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "nope" in line


def test_cli_kits_without_secrets_exits_2(tmp_path, capsys):
    assert main([str(tmp_path), "--kits", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "no private keys" in line


def test_console_script_is_installed(run_dir, kits):
    exe = Path(sys.executable).with_name("spleen-scan-secrets")
    done = subprocess.run([exe, str(run_dir), "--kits", str(kits)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("scanned 9 files (")
