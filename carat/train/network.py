"""Which address and interface a rank uses to reach the others, on hosts whose name may resolve to loopback.

Debian (and many cluster images) map a host's own name to 127.0.1.1 in /etc/hosts, so ``hostname
--ip-address`` and gloo's default device (the address the host name resolves to) both pick loopback, and a
second host can never connect. These helpers choose from the addresses the host really has.

    python -m carat.train.network address            # this host's routable address (the Ray head's, say)
    python -m carat.train.network interface 10.0.0.1 # the interface this host reaches 10.0.0.1 through
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Any

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"


def interface_addresses() -> dict[str, list[str]]:
    """IPv4 addresses of every interface that is up, loopback excluded."""
    import psutil

    stats = psutil.net_if_stats()
    found: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        if not stats.get(name) or not stats[name].isup:
            continue
        ips = [a.address for a in addrs if a.family == socket.AF_INET and not ipaddress.ip_address(a.address)
               .is_loopback]
        if ips:
            found[name] = ips
    return found


def source_address(destination: str) -> str | None:
    """The local address the kernel would send from to reach ``destination`` (no packet leaves: a UDP connect
    only picks the route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(destination), 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def routable_address() -> str:
    """This host's address for the other hosts: the one its name resolves to if that is a real interface
    address, else the source of the default route, else the first interface address."""
    own = {ip for ips in interface_addresses().values() for ip in ips}
    if not own:
        raise RuntimeError(f"host {socket.gethostname()} has no non-loopback IPv4 address: other hosts cannot "
                           "reach it")
    try:
        named = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        named = set()
    if named & own:
        return min(named & own)
    default = source_address("192.0.2.1")  # TEST-NET-1: any address routed by the default route
    if default in own:
        return default
    return sorted(own)[0]


def interface_towards(destination: str) -> str | None:
    """The interface that holds this host's source address towards ``destination`` (on the destination host
    itself: the interface that holds that address, not ``lo``); None for a loopback destination."""
    source = source_address(destination)
    if source is None or ipaddress.ip_address(source).is_loopback:
        return None
    return next((name for name, ips in interface_addresses().items() if source in ips), None)


def bind_gloo_to_master_route() -> None:
    """Point gloo at the interface towards MASTER_ADDR unless the user chose one: its default (the address the
    host name resolves to) is loopback on Debian-style hosts, where a cross-host world then never connects."""
    master = os.environ.get("MASTER_ADDR")
    if not master or os.environ.get(GLOO_IFNAME_ENV):
        return
    name = interface_towards(master)
    if name:
        os.environ[GLOO_IFNAME_ENV] = name


def rank_placement(rank: int) -> dict[str, Any]:
    """Where a rank runs: recorded in the run directory, so a multi-host run shows which hosts took part."""
    master = os.environ.get("MASTER_ADDR")
    address = source_address(master) if master else None
    if address is None or ipaddress.ip_address(address).is_loopback:
        try:
            address = routable_address()
        except RuntimeError:
            address = "127.0.0.1"
    return {"rank": rank, "host": socket.gethostname(), "address": address, "pid": os.getpid(),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carat.train.network",
                                     description="This host's routable address, or its interface towards another.")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("address", help="this host's address for the other hosts (the Ray head's, rank 0's)")
    towards = sub.add_parser("interface", help="the interface this host reaches DESTINATION through")
    towards.add_argument("destination")
    args = parser.parse_args(argv)
    try:
        print(routable_address() if args.what == "address" else interface_towards_or_fail(args.destination))
    except RuntimeError as exc:
        print(f"carat: {exc}", file=sys.stderr)
        return 1
    return 0


def interface_towards_or_fail(destination: str) -> str:
    name = interface_towards(destination)
    if name is None:
        raise RuntimeError(f"no interface on {socket.gethostname()} routes to {destination}")
    return name


if __name__ == "__main__":
    sys.exit(main())
