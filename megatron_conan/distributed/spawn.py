"""Run a function in N freshly spawned local processes that form a torch.distributed world.

The test harness (``megatron_conan.testing.distributed`` re-exports it) and the CPU quickstart use
it::

    results = run_distributed(body, world_size=4, args=(tmp_path,))

``body(rank, world_size, *args, **kwargs)`` must be a module-level (picklable) function. The
caller's process holds the world's rendezvous store on a port the OS picks when it binds it, so no
other process can take the port while the ranks start (a port picked free, released and bound by
rank 0 seconds later, after its imports, could be). Nothing of the world listens beyond this host:
the store binds 127.0.0.1 only and gloo the loopback interface (``distributed/ports.py``). Each process gets ``cpu_compat`` where CUDA is
absent, its own log prefix ``[rank N]``, and always destroys its process groups. The backend is
NCCL when there is one GPU per rank and gloo otherwise (:func:`harness_backend`); a gloo world runs
wholly on the CPU: its ranks start with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``), so weights,
batches and collectives can never end up on two devices (a 2-rank world on a 1-GPU host is such a
world). The call returns the list of per-rank
return values; if any rank raises, the others are terminated and an AssertionError carries every
failing rank's traceback, tagged by rank. A world that does not finish within ``timeout_s`` is
killed and reported the same way, so a hung collective fails a test instead of hanging CI.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from megatron_conan.console import configure_logging
from megatron_conan.environment import environment
from megatron_conan.distributed.ports import LOOPBACK, keep_gloo_on_loopback, loopback_store
from megatron_conan.warning_filters import silence_known_warnings

_POLL_S = 0.2


def threads_per_rank(world_size: int, cores: Optional[int] = None) -> int:
    """Intra-op threads of each rank of a local world: the cores this process may run on divided by
    the ranks (at least 1), so a one-rank world uses the whole machine and N ranks do not
    oversubscribe it (one thread per rank left a core idle in a one-rank world)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world_size))


def harness_backend(world_size: int, cuda_device_count: int) -> str:
    """NCCL only when every rank has a GPU of its own; NCCL refuses two ranks on one GPU, so a
    world larger than the GPU count (e.g. a 4-rank test on a 1-GPU machine) runs over gloo."""
    return "nccl" if cuda_device_count >= world_size > 0 else "gloo"


def visible_gpu_count() -> int:
    """GPUs this process sees (0 without CUDA); tests fake it to play a host with fewer GPUs."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_backend(world_size: int, backend: Optional[str] = None) -> str:
    """The backend a spawned world of `world_size` uses; NCCL asked for without a GPU per rank is
    refused here, in the parent, instead of failing in every rank."""
    gpus = visible_gpu_count()
    chosen = backend or harness_backend(world_size, gpus)
    if chosen == "nccl" and gpus < world_size:
        raise ValueError(f"backend nccl needs one GPU per rank: {world_size} ranks, {gpus} GPU(s) visible")
    return chosen


@contextlib.contextmanager
def _children_environment(backend: str) -> Iterator[None]:
    """Spawned children inherit the parent's environment as it is when they start: a gloo world's
    ranks get CUDA hidden, so torch in them finds no GPU and cpu_compat routes megatron-core's CUDA
    calls to the CPU, where gloo's tensors are. Otherwise weights would go to cuda:0 while the
    batches and collectives stayed on the CPU."""
    if backend == "nccl":
        yield
        return
    # The ranks' OpenMP threads (threads_per_rank) sleep while they wait instead of spinning: when the
    # cores are shared (other worlds, a test worker beside) spinning threads stall each other, 6-8x
    # slower on a loaded 2-core machine. Read when a child loads OpenMP, so set before it starts.
    with environment({"CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}):
        yield


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable,
            args: Sequence[Any], kwargs: Dict[str, Any], results: "mp.Queue", log_level: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
    )
    keep_gloo_on_loopback(LOOPBACK)
    configure_logging(log_level, f"[rank {rank}] %(name)s: %(message)s", log_level, force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-rank config dumps drown the output
    silence_known_warnings()
    try:
        import torch
        import torch.distributed as dist

        from megatron_conan.distributed.cpu_compat import enable_cpu_compat
        from megatron_conan.distributed.parallel import destroy_parallel

        torch.set_num_threads(threads_per_rank(world_size))
        enable_cpu_compat()
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore(LOOPBACK, port, is_master=False)  # the caller holds the server
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args, **kwargs)
        finally:
            destroy_parallel()
        # Tensors in a Queue travel as shared-memory handles that die with this process:
        # send plain bytes instead.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, tagged
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable,
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    timeout_s: float = 300.0,
    backend: Optional[str] = None,
    log_level: int = logging.INFO,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on `world_size` spawned ranks; see module doc.
    `log_level`: the ranks' logging level (WARNING keeps an interactive console to the point)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    backend = world_backend(world_size, backend)
    # bound here, on a loopback port the OS picks, until the world is over (module doc)
    store = loopback_store(timeout_s)
    port = store.port
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, backend, fn, tuple(args),
                                              dict(kwargs or {}), results, log_level), daemon=False)
        for rank in range(world_size)
    ]
    with _children_environment(backend):
        for process in processes:
            process.start()
    values: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    try:
        _collect(results, processes, values, errors, timeout_s)
    finally:
        _stop(processes, returned=not errors and len(values) == world_size)
    if errors:
        report = "\n".join(f"----- rank {rank} -----\n{text}" for rank, text in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    import torch

    return [torch.load(io.BytesIO(values[rank]), weights_only=False) for rank in range(world_size)]


def _collect(results: "mp.Queue", processes: List[mp.process.BaseProcess], values: Dict[int, Any],
             errors: Dict[int, str], timeout_s: float) -> None:
    """Fill `values` and `errors` (by rank) from the ranks' reports until every rank has reported, a
    rank failed (then what the others report within a second), or `timeout_s` passed."""
    world_size = len(processes)
    deadline = time.monotonic() + timeout_s
    while len(values) + len(errors) < world_size:
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(values) - set(errors))
            for rank in missing:
                errors[rank] = f"timed out after {timeout_s:.0f} s (hung or deadlocked)"
            return
        try:
            rank, status, payload = results.get(timeout=_POLL_S)
        except queue.Empty:
            dead = [r for r, p in enumerate(processes)
                    if p.exitcode not in (None, 0) and r not in values and r not in errors]
            for rank in dead:
                errors[rank] = f"process died with exit code {processes[rank].exitcode}"
            continue
        (values if status == "ok" else errors)[rank] = payload
        if errors:
            # One rank failed: the others are likely blocked in a collective with it.
            time.sleep(1.0)
            while True:
                try:
                    rank, status, payload = results.get_nowait()
                except queue.Empty:
                    break
                (values if status == "ok" else errors)[rank] = payload
            return


def _stop(processes: List[mp.process.BaseProcess], returned: bool) -> None:
    """End the world's processes: those of a world whose every rank `returned` are given time to exit."""
    if returned:
        # Ranks that returned are exiting: let them run their exit handlers, which stop helper
        # processes they started (dist_checkpointing's writer Manager); SIGTERM would orphan them.
        for process in processes:
            process.join(timeout=30)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
