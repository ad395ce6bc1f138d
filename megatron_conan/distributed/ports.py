"""Free TCP ports on the loopback interface for local process groups."""

import socket


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; the tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
