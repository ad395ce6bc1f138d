"""Reading a checkpoint runs none of its code (docs/DESIGN.md section 12, "Trust and safety").

A checkpoint is a file set someone else may have written, and every file of it that torch or
megatron-core reads is a pickle, which can name any importable callable to run on load. Each pickle
is read here under an allow-list instead:

- our ``common.pt`` and ``rng/rank_*.pt`` and megatron-core's ``model_optim/common.pt``:
  ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings only). RNG files
  written before RNG states became plain tensors hold NumPy arrays: NumPy's array reconstructor,
  ``ndarray`` and ``dtype`` are allowed for them (they build an array, nothing else);
- ``model_optim/.metadata``, torch's distributed-checkpoint index, which torch itself reads with a
  bare ``pickle.load``: first unpickled by :class:`_MetadataUnpickler`, which resolves only torch's
  checkpoint-metadata dataclasses and enums, ``torch.Size``, the dtypes and the layout lookup; a
  file naming anything else is refused before torch opens it;
- the non-tensor entries inside the ``.distcp`` shards, which torch's planner reads with
  ``weights_only=False``: the load runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set, which makes
  every ``torch.load`` of it weights-only.

A refusal is an :class:`~megatron_conan.errors.InputError`: one line, exit status 2, and the
offending callable never runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import os
import pickle
import re
from typing import Any, Dict

import torch

from megatron_conan.environment import environment
from megatron_conan.errors import InputError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch's switch that turns every ``torch.load`` into a weights-only one (read at each call)."""
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _legacy_numpy_globals() -> list:
    """What a pickled NumPy array names: its reconstructor (NumPy 1 and 2 spell its module
    differently), ``ndarray`` and ``dtype``; RNG files written before RNG states were tensors."""
    import numpy

    found = [numpy.ndarray, numpy.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            reconstruct = importlib.import_module(module)._reconstruct
            found.append((reconstruct, f"{module}._reconstruct"))
    found.append(type(numpy.dtype(numpy.uint32)))  # the MT19937 key array's dtype class
    return found


def refusal(path: str, error: BaseException) -> InputError:
    """The one-line error for a pickle that names more than plain data."""
    text = str(error)
    named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got <class '([^']+)'>", text)
    detail = f"it names {named.group(1)}" if named else type(error).__name__
    return InputError(f"{path} is not loaded: its pickle would run code on load ({detail}); a checkpoint "
                      f"file holds only tensors and plain data")


def load_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` (plus NumPy arrays, for older RNG files); a pickle that
    names anything else, or a file that is not a torch file, is one InputError."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise refusal(path, error) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as error:
        if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise InputError(f"{path} is not a torch checkpoint file ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'unreadable'})") from None


# -- torch distributed-checkpoint metadata ---------------------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
"""Modules whose dataclasses and enums make up a ``.metadata`` file."""


def _allowed_metadata_global(module: str, name: str) -> Any:
    """The object `module.name` if a ``.metadata`` pickle may name it, else None."""
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, torch.dtype) or value is torch.Size else None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout  # looks up a layout by name
    if (module, name) == ("collections", "OrderedDict"):
        import collections

        return collections.OrderedDict
    if module in _DCP_MODULES:
        value = getattr(importlib.import_module(module), name, None)
        is_plain_class = isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))
        return value if is_plain_class else None
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file, resolving only :func:`_allowed_metadata_global`'s names."""

    def find_class(self, module: str, name: str) -> Any:
        value = _allowed_metadata_global(module, name)
        if value is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return value


def check_dist_metadata(shards_dir: str) -> None:
    """Refuse a distributed checkpoint whose ``.metadata`` pickle names anything but torch's own
    checkpoint-metadata types (before torch reads it with a bare ``pickle.load``)."""
    path = os.path.join(shards_dir, ".metadata")
    if not os.path.isfile(path):
        raise InputError(f"{shards_dir} is not a distributed checkpoint (no .metadata in it)")
    with open(path, "rb") as handle:
        try:
            _MetadataUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            raise refusal(path, error) from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            raise InputError(f"{path} is not distributed-checkpoint metadata ({type(error).__name__})") from None


def weights_only_loads():
    """Every ``torch.load`` inside the block is weights-only, whatever its caller asked for."""
    return environment({FORCE_WEIGHTS_ONLY: "1", _FORCE_NO_WEIGHTS_ONLY: None})


def load_dist_checkpoint(sharded_state_dict: Dict[str, Any], shards_dir: str) -> Dict[str, Any]:
    """megatron-core ``dist_checkpointing.load`` of `shards_dir`, with its metadata checked first and
    every pickle inside read weights-only (module docstring)."""
    from megatron.core import dist_checkpointing

    check_dist_metadata(shards_dir)
    try:
        with weights_only_loads():
            return dist_checkpointing.load(sharded_state_dict, shards_dir)
    except pickle.UnpicklingError as error:
        raise refusal(shards_dir, error) from None
