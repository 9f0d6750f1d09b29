"""Namespaced hosts without root: each run's names carry its own token and fit the kernel's limits, subnets are
leased so two networks never share one, and a record can only ever make a network remove what that record's run
made (a dead owner's record is cleaned, a live one's or another PID namespace's is not)."""

from __future__ import annotations

import os
import subprocess

import pytest

from spleen_tools.procs import ProcessRef, write_json
from spleen_tools.systems.netns import (
    IFNAMSIZ,
    HostNetwork,
    NetnsError,
    lease,
    new_token,
    own_records_dir,
    recorded_names,
)


def test_every_name_fits_the_kernel_and_carries_the_run_token():
    net = HostNetwork({f"site-{i}": (f"site-{i}",) for i in range(253)}, prefix="abcdefgh")
    net.token = new_token()
    cables = [name for i in range(2, 255) for name in net.cable(i)]
    assert all(len(name) <= IFNAMSIZ and net.token in name for name in [net.bridge, *cables])
    assert len(set(cables)) == len(cables)
    namespaces = [net.switch, *(net.namespace(i) for i in range(2, 255))]
    assert recorded_names({"token": net.token, "namespaces": namespaces, "hosts_files": []})["namespaces"] == (
        namespaces
    )  # what a run makes is what its record may remove


@pytest.mark.parametrize("prefix", ["", "../x", "spl-", "Spl", "toolongprefix"])
def test_a_prefix_that_is_no_plain_short_name_is_refused(prefix):
    with pytest.raises(NetnsError, match="prefix"):
        HostNetwork({"server": ("server",)}, prefix=prefix)


def test_host_names_and_subnets_that_would_write_more_than_a_name_are_refused():
    with pytest.raises(NetnsError, match="host names"):
        HostNetwork({"server": ("server\n10.0.0.1 evil",)})
    with pytest.raises(ValueError):
        HostNetwork({"server": ("server",)}, subnet="10.231.7.0/../x")


def test_two_leases_get_their_own_subnets_and_a_taken_one_is_refused_until_freed(tmp_path):
    records = tmp_path / "records"
    first, second = lease(records, "aaaaaa"), lease(records, "bbbbbb")
    assert first.subnet != second.subnet
    with pytest.raises(NetnsError, match="in use"):
        lease(records, "cccccc", first.subnet)
    assert first.remove_made() == [] and not first.path.exists()  # made nothing: the lease is freed
    assert lease(records, "dddddd", first.subnet).subnet == first.subnet


def _gone_owner() -> dict:
    sleeper = subprocess.Popen(["sleep", "60"])
    owner = ProcessRef.of(sleeper.pid).to_json()
    sleeper.kill()
    sleeper.wait()
    return owner


def test_only_a_record_whose_owner_is_gone_is_cleaned(tmp_path):
    records = own_records_dir(tmp_path / "records")
    pidns = os.readlink("/proc/self/ns/pid")
    empty = {"token": "abcdef", "namespaces": [], "hosts_files": []}
    dead = records / "10.231.1.json"
    write_json(dead, {**empty, "owner": _gone_owner(), "pidns": pidns, "subnet": "10.231.1"})
    elsewhere = records / "10.231.2.json"  # another PID namespace's: its PIDs mean nothing here
    write_json(elsewhere, {**empty, "owner": _gone_owner(), "pidns": "pid:[1]", "subnet": "10.231.2"})
    live = lease(records, "bbbbbb", "10.231.3")

    assert lease(records, "cccccc", "10.231.1").subnet == "10.231.1"  # the dead run's lease was freed
    assert elsewhere.exists() and live.path.exists()
    with pytest.raises(NetnsError, match="in use"):
        lease(records, "dddddd", "10.231.3")


def test_a_record_never_names_what_its_run_could_not_have_made():
    data = {
        "token": "abcdef",
        "namespaces": ["spl-abcdef-2", "spl-abcdef-sw", "spl-2", "spl-switch", "spl-abcde0-2", "../../x", 5],
        "hosts_files": ["spl-abcdef-2", "spl-abcdef-2/../../../etc", "/etc"],
    }
    assert recorded_names(data) == {"namespaces": ["spl-abcdef-2", "spl-abcdef-sw"], "hosts_files": ["spl-abcdef-2"]}
    with pytest.raises(ValueError):
        recorded_names({**data, "token": "abc.*"})


def test_a_records_folder_that_others_can_write_or_a_link_is_refused(tmp_path):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    for path in (open_to_all, tmp_path / "link"):
        with pytest.raises(NetnsError, match="only it can write"):
            own_records_dir(path)
