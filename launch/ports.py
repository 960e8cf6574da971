"""Master ports: where a launcher's rank 0 listens.

Chosen below Linux's default ephemeral range (32768-60999), from which the kernel picks the local port of every
outgoing connection and of every bind to port 0: a master port in that range may be taken by any process on the
node between the moment it is chosen and the moment rank 0's TCPStore listens on it. Torch-free, so the command
that picks a port starts fast.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

MASTER_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def ephemeral_ports() -> range:
    """The ports this kernel hands out by itself (Linux's default when /proc does not say)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(ports: range = MASTER_PORTS) -> int:
    """A port of `ports` nothing listens on now, outside the kernel's ephemeral range, never the same twice
    in one process: a launcher started with it binds it seconds later. A port from bind(("", 0)) is free only
    until the kernel gives it to another socket, which once failed a CI run (EADDRINUSE, 2026-12-08)."""
    ephemeral = ephemeral_ports()
    candidates = [p for p in ports if p not in ephemeral and p not in _handed_out]
    for port in random.SystemRandom().sample(candidates, len(candidates)):  # whatever seeds the global one
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:  # someone listens there, or a closed connection still holds it
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {ports.start}-{ports.stop - 1} outside the kernel's ephemeral range "
                       f"{ephemeral.start}-{ephemeral.stop - 1} (/proc/sys/net/ipv4/ip_local_port_range)")
