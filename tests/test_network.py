"""carat.train.network: the address and interface a rank uses to reach the others, never loopback for another
host (the testbed's hosts, whose names resolve to 127.0.1.1, exercise it for real in tests/test_testbed.py)."""

from __future__ import annotations

import ipaddress
import os

import pytest

from carat.train import network


def test_routable_address_is_a_real_interface_address_never_loopback():
    address = network.routable_address()
    assert not ipaddress.ip_address(address).is_loopback
    assert any(address in ips for ips in network.interface_addresses().values())


def test_interface_towards_an_address_of_this_host_is_the_interface_that_holds_it():
    address = network.routable_address()
    holder = next(name for name, ips in network.interface_addresses().items() if address in ips)
    assert network.interface_towards(address) == holder  # not `lo`, though the kernel routes it through lo
    assert network.interface_towards("127.0.0.1") is None


def test_gloo_is_bound_towards_master_unless_the_user_chose(monkeypatch):
    address = network.routable_address()
    monkeypatch.delenv(network.GLOO_IFNAME_ENV, raising=False)
    monkeypatch.setenv("MASTER_ADDR", address)
    network.bind_gloo_to_master_route()
    assert network.GLOO_IFNAME_ENV in os.environ
    monkeypatch.setenv(network.GLOO_IFNAME_ENV, "mine0")
    network.bind_gloo_to_master_route()
    assert os.environ[network.GLOO_IFNAME_ENV] == "mine0"
    monkeypatch.delenv(network.GLOO_IFNAME_ENV)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # one host: gloo's own choice is right
    network.bind_gloo_to_master_route()
    assert network.GLOO_IFNAME_ENV not in os.environ


def test_rank_placement_names_host_and_a_routable_address(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    placement = network.rank_placement(3)
    assert placement["rank"] == 3 and placement["host"] and placement["pid"] > 0
    assert not ipaddress.ip_address(placement["address"]).is_loopback


@pytest.mark.parametrize("argv, rc", [(["address"], 0), (["interface", "127.0.0.1"], 1), (["bogus"], 2)])
def test_command_line(argv, rc, capsys):
    if rc == 2:  # argparse's usage error
        with pytest.raises(SystemExit) as exited:
            network.main(argv)
        assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err
        return
    assert network.main(argv) == rc
    out = capsys.readouterr()
    if rc == 0:
        assert not ipaddress.ip_address(out.out.strip()).is_loopback
    elif rc == 1:
        assert "no interface" in out.err
