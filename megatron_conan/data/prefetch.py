"""Reading ahead of the step: a background thread prepares a stateful loader's next batches while
the current step runs (the Trainer wraps its loader in one unless ``train.prefetch`` is off).

``Prefetcher(loader, depth)`` is itself a stateful iterator over the same batches in the same
order. One thread calls ``next(loader)`` and puts each batch, with the loader's state after it,
into a queue of at most ``depth`` batches (one more may be built and waiting to go in). So:

* ``state_dict()`` is the state after the last batch *handed out*: it names the next batch the
  step will consume, not the ones the thread has read ahead;
* an exception in the thread (or the end of a finite loader) is raised by the ``next()`` that
  would have returned the batch it stopped at, and the thread ends;
* ``close()`` stops the thread and sets the loader back to ``state_dict()``, so a later ``next()``
  (or ``load_state_dict``) goes on from there. The thread starts at the first ``next()``.

The loader must not communicate (no collectives: the thread runs beside the step's own) and must
not be used by anything else while the thread runs.
"""

from __future__ import annotations

import queue
import threading
from typing import Dict, Iterator, Mapping, Optional, Protocol, Tuple


class StatefulLoader(Protocol):
    """An iterator of batches whose position is a state dict (``ContrastiveLoader``)."""

    def __iter__(self) -> Iterator[object]: ...

    def __next__(self) -> object: ...

    def state_dict(self) -> Dict[str, object]: ...

    def load_state_dict(self, state: Mapping[str, object]) -> None: ...


_POLL_S = 0.1
"""How often a thread blocked on a full queue looks for a stop request."""


class Prefetcher:
    """`loader` read ahead by a background thread, `depth` batches queued (module doc)."""

    def __init__(self, loader: StatefulLoader, depth: int = 1):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.loader, self.depth = loader, depth
        self._state = loader.state_dict()
        self._queue: Optional[queue.Queue] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> object:
        if self._thread is None:
            self._start()
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()  # the thread has ended; the loader goes back to the last batch handed out
            raise error
        self._state = state
        return batch

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop), name="batch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _fill(self, out: queue.Queue, stop: threading.Event) -> None:
        """The thread: batches (with the state after each) into `out` until `stop`, or an error."""
        while not stop.is_set():
            try:
                item: Tuple[object, Optional[Dict[str, object]], Optional[BaseException]] = (
                    next(self.loader), self.loader.state_dict(), None)
            except BaseException as error:  # StopIteration too: a finite loader's end
                item = (None, None, error)
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def state_dict(self) -> Dict[str, object]:
        """The loader's state after the last batch handed out (the next one the step consumes)."""
        return dict(self._state)

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Go on from `state`: the read-ahead batches are dropped."""
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the thread, drop what it read ahead and set the loader back to :meth:`state_dict`."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._queue is not None:
            self._queue = None
            self.loader.load_state_dict(self._state)
