"""Local addresses for process groups whose ranks all run on this host: free loopback ports, a
rendezvous store that listens on loopback only, and gloo kept on the loopback interface.

A torch ``TCPStore`` server binds every interface (``::``) and answers anyone who connects, and
gloo listens on the address the host name resolves to; neither is needed when every rank is on this
host. docs/DESIGN.md section 12 lists what a multi-node run opens instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import sys

LOOPBACK = "127.0.0.1"
GLOO_INTERFACE_VARIABLE = "GLOO_SOCKET_IFNAME"
"""gloo's switch for the network interface its pairs listen on."""
LOOPBACK_INTERFACE = "lo"
"""Linux's loopback interface."""


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; the tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or ``localhost``) is this host's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_store(timeout_s: float):
    """A ``TCPStore`` server for a world of this host's processes, listening on 127.0.0.1 only (on
    a port the OS picks, held until the store is gone). Clients connect to ``store.port``."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        # the store takes the bound socket instead of binding its own on every interface
        store = dist.TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it with itself
    return store


def keep_gloo_on_loopback(master_addr: str) -> None:
    """In a world whose rendezvous is on loopback (every rank on this host), make gloo listen on the
    loopback interface (Linux) unless the user chose an interface: gloo's default is the address
    the host name resolves to, which other machines can reach."""
    if sys.platform.startswith("linux") and is_loopback(master_addr):
        os.environ.setdefault(GLOO_INTERFACE_VARIABLE, LOOPBACK_INTERFACE)
