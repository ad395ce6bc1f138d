"""A spawned local world listens on nothing but loopback: its rendezvous store binds 127.0.0.1 (a
default TCPStore binds every interface) and gloo's pairs the loopback interface. Read from
/proc/<pid>/net/tcp{,6} for the sockets of the world's own processes while it runs."""

import os
import sys

import pytest

from megatron_conan.testing.distributed import run_distributed
from megatron_conan.testing.sockets import tcp_sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _sockets_body(rank, world_size):
    import torch
    import torch.distributed as dist

    from megatron_conan.config.model import ParallelConfig
    from megatron_conan.distributed.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(tensor_parallel=2))  # megatron-core's groups too
    dist.all_reduce(torch.ones(1))  # every pair of the default group connected
    dist.barrier()
    found = {pid: tcp_sockets(pid) for pid in (os.getpid(), os.getppid())}  # this rank and the caller
    dist.barrier()  # no rank leaves (closing its sockets) before all have looked
    return found


def test_a_spawned_world_opens_no_socket_beyond_loopback():
    results = run_distributed(_sockets_body, 2)
    sockets = [socket for found in results for held in found.values() for socket in held]
    listening = [socket for socket in sockets if socket.listening]
    assert listening and len({socket.pid for socket in listening}) >= 2, sockets  # the store and gloo seen
    outside = [socket for socket in sockets if not socket.loopback]
    assert not outside, outside
