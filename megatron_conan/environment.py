"""Environment variables changed for the length of a block, then put back as they were: for
settings that torch or child processes read from the environment (a value of None unsets one)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Optional


@contextlib.contextmanager
def environment(changes: Mapping[str, Optional[str]]) -> Iterator[None]:
    """Sets each variable of `changes` (unsets those given None) inside the block; afterwards each
    holds its earlier value again, or is unset if it was unset before."""
    saved = {name: os.environ.get(name) for name in changes}
    for name, value in changes.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
