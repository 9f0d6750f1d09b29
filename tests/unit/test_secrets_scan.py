"""The secrets scan on real material: RSA keys and certificates as nvflare provision writes them, a real TenSEAL
CKKS context from NVFlare's HEBuilder, laid out as startup kits; then planted copies that must be found and public
files that must not be.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import tenseal
from cryptography.hazmat.primitives import serialization
from nvflare.lighter.impl.he import HEBuilder
from nvflare.lighter.utils import Identity, generate_cert, generate_keys, serialize_cert, serialize_pri_key

from spleen_tools.cli.scan_secrets import main
from spleen_tools.run.kit_secrets import Secret, known_secrets
from spleen_tools.run.secrets_scan import CHUNK_SIZE, scan

PROJECT = "secure_project"
PARTICIPANTS = {"localhost": "server", "site-1": "client", "site-2": "client", "admin@nvidia.com": "client"}


def _pem_body(pem: bytes) -> str:
    """The base64 lines of a PEM block, without its BEGIN/END lines."""
    return "\n".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    """<workspace>/secure_project/{prod_00/<participant>/startup, state/cert.json} as nvflare provision writes it."""
    ws = tmp_path_factory.mktemp("workspace")
    root_key, root_pub = generate_keys()
    root = Identity(PROJECT)
    root_pem = serialize_cert(generate_cert(root, root, root_key, root_pub, ca=True))
    state = {"root_cert": root_pem.decode(), "root_pri_key": serialize_pri_key(root_key).decode()}
    he = HEBuilder()
    he.initialize(None, None)
    for name, base in PARTICIPANTS.items():
        startup = ws / PROJECT / "prod_00" / name / "startup"
        startup.mkdir(parents=True)
        key, pub = generate_keys()
        cert = serialize_cert(generate_cert(Identity(name, "nvidia"), root, root_key, pub))
        (startup / f"{base}.key").write_bytes(serialize_pri_key(key))
        (startup / f"{base}.crt").write_bytes(cert)
        (startup / "rootCA.pem").write_bytes(root_pem)
        (startup / "signature.json").write_text(json.dumps({f"{base}.crt": "c2lnbmF0dXJl"}))
        state[name] = {"cert": cert.decode(), "pri_key": serialize_pri_key(key).decode()}
        if name == "localhost":
            (startup / "server_context.tenseal").write_bytes(he.get_serialized_context())
        elif name.startswith("site-"):
            (startup / "client_context.tenseal").write_bytes(he.get_serialized_context(is_client=True))
    (ws / PROJECT / "state").mkdir()
    (ws / PROJECT / "state" / "cert.json").write_text(json.dumps(state))
    return ws


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
    secret = next(s for s in secrets if secret_name in s.name)
    for needle in secret.needles:
        data = bytearray(os.urandom(3 * 4096))
        data[4096 - 7 : 4096 - 7 + len(needle)] = needle  # straddles the first border
        (tmp_path / "piece.bin").write_bytes(bytes(data))
        findings = scan([tmp_path], secrets, chunk_size=4096).findings
        assert len(findings) == 1, (needle, findings)
        (finding,) = findings
        assert finding.what == f"copy of {secret.name}" and finding.detail == f"at byte {4096 - 7}"


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


def test_scan_of_a_large_run_dir_takes_seconds(tmp_path, secrets):
    (tmp_path / "big.bin").write_bytes(os.urandom(64 << 20))
    start = time.perf_counter()
    report = scan([tmp_path], secrets)
    assert report.clean and report.bytes == 64 << 20
    assert time.perf_counter() - start < 3


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
