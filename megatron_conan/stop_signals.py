"""SIGTERM and SIGUSR1 from a command's first moment: SLURM's time-limit warning
(``#SBATCH --signal=B:USR1@N``, which ``examples/slurm/requeue_on_signal.sh`` passes to srun and
srun to every task), preemption and ``scancel``.

Python's default action for SIGUSR1 ends the process, and SLURM may send its warning up to a minute
before the time it names: to a job restarted near its limit, while the ranks are still importing and
starting. So the stage commands install this handling first (``run_command(...,
handle_stop_signals=True)``, before any heavy import), and a signal means, by phase:

    starting   before the ranks share a process group (imports, config, rendezvous): the process
               exits at once with status 0, having written nothing. A watcher thread does it, woken
               through ``signal.set_wakeup_fd``: a Python handler alone runs only when the main
               thread is back in Python, and the rendezvous blocks in C++ until its timeout.
    together   once the process group exists (:func:`stop_together`): the signal is only recorded.
               A rank leaving alone would fail the others' next collective; the trainer's
               ``Preemption`` callback all-reduces the flag before the first step (a signal during
               model build or checkpoint load: stop there, nothing saved) and after every step (stop,
               that step saved).

Either way the command exits 0 and nothing newer than the run's ``latest`` checkpoint is half
written; the SLURM wrapper then requeues the job when the signal was the time-limit warning.
This module imports only the standard library: it must be cheap to import before everything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from typing import Callable, Dict, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _exit_before_training(signum: int) -> None:
    """The starting phase's answer to a stop signal: one line on stderr, status 0, at once."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    line = (f"[rank {rank}] megatron_conan.stop_signals: {signal.Signals(signum).name} during start-up: "
            "exiting before training; nothing was written, the run resumes from its latest checkpoint\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    os._exit(0)


class StopSignals:
    """Records SIGTERM / SIGUSR1 (:attr:`received`); in the starting phase (`exit_at_once`) a
    watcher thread ends the process on one (`on_starting_signal`, normally a clean exit 0)."""

    def __init__(self, exit_at_once: bool = True,
                 on_starting_signal: Callable[[int], None] = _exit_before_training):
        self.received: Optional[int] = None
        """The last stop signal received (its number), None before any."""
        self.exit_at_once = exit_at_once
        self.on_starting_signal = on_starting_signal
        self._previous: Dict[int, object] = {}
        self._previous_wakeup_fd = -1
        self._sockets: Optional[tuple] = None
        self._watcher: Optional[threading.Thread] = None

    def install(self) -> "StopSignals":
        """Handle SIGTERM and SIGUSR1 (main thread only); in the starting phase, start the watcher."""
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        if self.exit_at_once:
            reader, writer = socket.socketpair()
            writer.setblocking(False)  # set_wakeup_fd refuses a blocking descriptor
            self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._sockets = (reader, writer)
            self._watcher = threading.Thread(target=self._watch, args=(reader,), name="stop-signal-watcher",
                                             daemon=True)
            self._watcher.start()
        return self

    def _record(self, signum, frame) -> None:
        self.received = signum

    def _watch(self, reader: socket.socket) -> None:
        # Each signal with a Python handler arrives here as one byte (its number), written by the
        # interpreter's C-level handler the moment it is delivered, whatever the main thread does.
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self.received = signum
                    if self.exit_at_once:
                        self.on_starting_signal(signum)

    def stop_together(self) -> None:
        """The ranks share a process group now: from here a signal is only recorded, and the
        trainer stops every rank together. Ends the watcher and gives the wakeup fd back."""
        self.exit_at_once = False
        self._stop_watcher()

    def _stop_watcher(self) -> None:
        if self._sockets is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        reader, writer = self._sockets
        writer.close()  # the watcher's recv returns b"": it ends
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        reader.close()
        self._sockets, self._watcher = None, None

    def uninstall(self) -> None:
        """Restore the handlers (and wakeup fd) found at :meth:`install`."""
        self._stop_watcher()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGTERM / SIGUSR1 held back in this thread for the body (they stay pending, then arrive as
    usual). Processes the body starts inherit the mask and so never see them: SLURM signals every
    process of a job step, and megatron-core's checkpoint writer keeps a helper process, spawned at
    the first save, whose death by the signal would fail that save and every later one."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_installed: Optional[StopSignals] = None


def installed() -> Optional[StopSignals]:
    """The handling the running command installed, or None (a run started from Python)."""
    return _installed


def stop_together() -> None:
    """Called once the process group exists: see :meth:`StopSignals.stop_together` (no-op when
    nothing is installed)."""
    if _installed is not None:
        _installed.stop_together()


@contextlib.contextmanager
def stop_signals_installed(restore: bool = True) -> Iterator[Optional[StopSignals]]:
    """Install the starting-phase handling for the body. After it, `restore` puts back what was
    there (a command called from Python); without it (a command that is the process) the stop
    signals are ignored until the process exits: the work is done, and the interpreter's exit, which
    can take seconds after a training run, puts the default action back for signals with a Python
    handler, so a repeated SIGUSR1 would kill the task and srun report it killed. Outside the main
    thread (where signals cannot be handled) it does nothing and yields None."""
    global _installed
    if threading.current_thread() is not threading.main_thread() or _installed is not None:
        yield _installed
        return
    signals = StopSignals().install()
    _installed = signals
    try:
        yield signals
    finally:
        _installed = None
        if restore:
            signals.uninstall()
        else:
            signals.stop_together()
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
