"""start_fl_secure.sh's command line: shorthands, one-line errors naming the fix."""

from __future__ import annotations

import os
import signal
import time

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


@pytest.mark.parametrize(
    "signum, code, line", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_mid_command_stops_it_as_the_one_command_does(signum, code, line, monkeypatch, capsys):
    """SIGTERM (a service manager) and Ctrl-C end a command through its cleanup, each with its own exit status."""
    reached_cleanup = []

    def status_that_gets_signalled(args) -> int:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
            return 0
        finally:
            reached_cleanup.append(True)

    monkeypatch.setattr(cli, "_status", status_that_gets_signalled)
    before = signal.getsignal(signal.SIGTERM)
    # Ctrl-C as a terminal's foreground job gets it: a suite started in the background inherits SIGINT ignored
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["--status"]) == code
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert reached_cleanup == [True]
    assert capsys.readouterr().err == f"{line}: stopped what was started\n"
    assert signal.getsignal(signal.SIGTERM) is before, "the command leaves the SIGTERM handler as it found it"
