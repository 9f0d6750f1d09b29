"""``spleen-bench validity``'s input (spleen_tools.cli.bench, spleen_tools.bench.study_settings): defaults,
--settings, --methods, --seeds / --seed, and bad input as one line with exit 2 before anything is made."""

from __future__ import annotations

import pytest

from spleen_tools.bench.study_settings import DATA_SETTINGS, ValiditySettings
from spleen_tools.cli import bench as cli


def test_settings_epochs_and_tiny_defaults():
    assert ValiditySettings().epochs == 50
    args = cli.build_parser().parse_args(["validity", "--tiny"])
    settings = cli.settings_from(args)
    assert (settings.rounds, settings.local_epochs, settings.tiny) == (1, 1, True)
    args = cli.build_parser().parse_args(["validity", "--rounds", "3", "--settings", "noniid"])
    assert cli.settings_from(args).epochs == 15 and cli.settings_from(args).settings == ("noniid",)


def test_phase_setting_is_accepted_but_not_run_by_default():
    assert DATA_SETTINGS == ("iid", "noniid", "phase")
    assert ValiditySettings().settings == ("iid", "noniid")
    assert cli.settings_from(cli.build_parser().parse_args(["validity"])).settings == ("iid", "noniid")
    args = cli.build_parser().parse_args(["validity", "--tiny", "--settings", "phase"])
    assert cli.settings_from(args).settings == ("phase",)
    args = cli.build_parser().parse_args(["validity", "--settings", "iid,noniid,phase"])
    assert cli.settings_from(args).settings == DATA_SETTINGS


def _settings(*argv: str) -> ValiditySettings:
    return cli.settings_from(cli.build_parser().parse_args(["validity", *argv]))


def test_default_study_is_fedavg_at_seed_0():
    assert (_settings().methods, _settings().seeds) == (("fedavg",), (0,))
    assert (ValiditySettings().methods, ValiditySettings().seeds) == (("fedavg",), (0,))


def test_methods_and_seeds_parsed():
    settings = _settings("--methods", "fedavg, fedprox,fedopt,fedbn", "--seeds", "0,1")
    assert settings.methods == ("fedavg", "fedprox", "fedopt", "fedbn") and settings.seeds == (0, 1)
    assert _settings("--seed", "3").seeds == (3,)  # --seed N stays one seed
    assert _settings("--seeds", "7").seeds == (7,)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["validity", "--rounds", "0"], "--rounds must be at least 1"),
        (["validity", "--local-epochs", "-2"], "--local-epochs must be at least 1"),
        (["validity", "--sites", "1"], "--sites must be between 2 and 8"),
        (["validity", "--settings", "iid,weird"], "unknown data setting 'weird': expected iid, noniid, phase"),
        (["validity", "--settings", "phase,phase"], "--settings lists a data setting twice"),
        (["validity", "--settings", ","], "--settings needs at least one"),
        (["validity", "--methods", "fedavg,fednova"], "unknown method 'fednova': expected fedavg, fedbn, fedopt"),
        (["validity", "--methods", "fedprox,fedprox"], "--methods lists a method twice"),
        (["validity", "--methods", ""], "--methods needs at least one of fedavg"),
        (["validity", "--seeds", "0,x"], "not a comma-separated list of whole numbers: '0,x'"),
        (["validity", "--seeds", "0,0"], "--seeds lists a seed twice"),
        (["validity", "--seeds", ","], "--seeds needs at least one seed"),
        (["validity", "--seeds", "1,-2"], "a seed must be 0 or more, got -2"),
        (["validity", "--seed", "-1"], "a seed must be 0 or more, got -1"),
        (["validity", "--seed", "1", "--seeds", "0,1"], "--seed N is --seeds N: give one of them"),
        (["validity", "--rounds", "two"], "invalid int value"),
        (["validity", "--bogus"], "unrecognized arguments"),
        (["fancy"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli.main([*argv, "--out", str(out)] if argv and argv[0] == "validity" else argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists(), "bad input must not make an output folder"


def test_out_must_be_new_or_empty(capsys, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    assert cli.main(["validity", "--tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "not an empty folder" in err and err.count("\n") == 1
