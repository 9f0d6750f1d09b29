"""The shell string that hides other sites' data on a site's host: every folder name reaches ``mount`` as one
word, whatever it holds (a space, quotes, ``$(...)``), and none is ever run as shell. The string is run for real,
in a user + mount namespace of its own (no root needed; the machine's mounts are untouched)."""

from __future__ import annotations

import subprocess

import pytest

from spleen_tools.systems.hosts import hide_folders_script, without_folders

NAMES = ["$(touch pwned)", "`touch pwned`; touch pwned #", 'it\'s a "dir"']
USERNS = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


def _userns_available() -> bool:
    try:
        return subprocess.run([*USERNS, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _userns_available(), reason="needs `unshare --user --map-root-user` (user namespaces)")
def test_folders_with_quotes_spaces_and_substitutions_are_hidden_and_never_run(tmp_path):
    folders = []
    for name in NAMES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "image.nii.gz").write_bytes(b"data")
        folders.append(tmp_path / name)
    listing = ["find", *map(str, folders), "-mindepth", "1"]

    done = subprocess.run(
        [*USERNS, "sh", "-c", hide_folders_script(folders), "sh", *listing],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # every folder covered, so empty inside
    assert not (tmp_path / "pwned").exists()  # no name was run as a command
    assert all((d / "image.nii.gz").read_bytes() == b"data" for d in folders)  # outside: untouched


def test_the_command_runs_as_given_after_the_script():
    cmd = ["python", "-c", "print('a b')", "$HOME"]
    wrapped = without_folders([], cmd)
    assert wrapped[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert wrapped[-len(cmd) - 1 :] == ["sh", *cmd]  # "$@": passed as arguments, never inside the string
    assert hide_folders_script([]) == 'exec "$@"'
