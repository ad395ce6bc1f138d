"""The TCP sockets a process holds, read from ``/proc`` (Linux): for tests that check what a local
world listens on and connects from.

``/proc/<pid>/net/tcp`` and ``tcp6`` list every socket of the process's network namespace (other
people's too: another test's bridge may have 10.x addresses at the same moment), so a socket counts
only when one of the process's own descriptors (``/proc/<pid>/fd``) points at its inode.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import List, Set

LISTEN = "0A"
"""The state column of a listening socket in ``/proc/net/tcp``."""


@dataclasses.dataclass(frozen=True)
class TCPSocket:
    pid: int
    address: str
    """Local address (IPv4 or IPv6 text)."""
    port: int
    listening: bool

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.address)
        mapped = getattr(address, "ipv4_mapped", None)
        return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    directory = f"/proc/{pid}/fd"
    for descriptor in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, descriptor))
        except OSError:  # closed while we read
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _address(hex_address: str) -> str:
    """``/proc/net/tcp*``'s address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def tcp_sockets(pid: int) -> List[TCPSocket]:
    """Every TCP socket (IPv4 and IPv6) that process `pid` holds a descriptor of."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}", encoding="ascii") as handle:
            rows = handle.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            if fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            found.append(TCPSocket(pid, _address(address), int(port, 16), fields[3] == LISTEN))
    return found
