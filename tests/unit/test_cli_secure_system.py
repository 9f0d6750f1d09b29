"""start_fl_secure.sh's command line: shorthands, one-line errors naming the fix."""

from __future__ import annotations

import pytest
from secure_kits import fake_kits

from spleen_tools.cli import secure_system as cli


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["2"], ["start", "2"]),
        (["3", "--data", "d"], ["start", "3", "--data", "d"]),
        (["--stop"], ["stop"]),
        (["--status", "--workspace", "w"], ["status", "--workspace", "w"]),
        (["provision"], ["provision"]),
    ],
)
def test_cli_shorthands(argv, expected):
    assert cli.normalize(argv) == expected


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["0"], "must be at least 1"),
        (["start", "two"], "expected a number of sites"),
        (["launch"], "invalid choice"),
        (["2", "--no-such-option"], "unrecognized arguments"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_cli_without_arguments_asks_for_n(capsys):
    assert cli.main([]) == 2
    assert "give the number of sites (./start_fl_secure.sh 2)" in capsys.readouterr().out


def test_cli_not_provisioned_names_the_fix(tmp_path, capsys):
    assert cli.main(["2", "--workspace", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "provision it first (./start_fl_secure.sh provision)" in err, err


def test_cli_stop_with_nothing_running(tmp_path, capsys):
    assert cli.main(["--stop", "--workspace", str(fake_kits(tmp_path))]) == 0
    assert "nothing to stop" in capsys.readouterr().out
