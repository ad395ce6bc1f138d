"""Device placement: the one place that decides where tensors live, and the collectives that use it.

A collective only works on tensors of its backend's device: NCCL takes CUDA tensors, gloo CPU ones.
A batch the model reads must sit where the model's weights are. Both follow from the backend of the
default process group, so they are decided here once:

    placement = current_placement()          # cuda:<LOCAL_RANK> under NCCL, cpu under gloo / no world
    batch = placement.to_device(batch)       # every tensor of a dict / list / dataclass, recursively
    flag = placement.zeros(1)                # a collective buffer on the right device
    placement.all_reduce(flag, op=MAX)       # collectives check the device first

Library code hands batches to models and issues collectives only through a ``Placement`` (a test
walks the package to keep it so); megatron-core's own collectives are on its own buffers. A tensor
on the wrong device reaching a collective raises an error naming the collective, the tensor's
device and the backend, instead of NCCL's opaque failure.

Tests record what passes through with ``Placement.recording()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Record = Tuple[str, torch.device, Tuple[int, ...], int]
"""(what: "batch" or the collective's name, the tensor's device, its shape, its data_ptr)."""


class DevicePlacementError(RuntimeError):
    """A tensor reached a collective on a device its backend cannot use."""


def backend_device(backend: Optional[str] = None) -> torch.device:
    """The device whose tensors `backend` (default: the default group's) exchanges."""
    if backend is None:
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if backend is not None and "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def indexed_device(device) -> torch.device:
    """`device` with its index: "cuda" means this process's current GPU. A tensor on "cuda" reports
    "cuda:0", and ``torch.device("cuda") != torch.device("cuda:0")``, so an index-less device in a
    placement would refuse every tensor at the first collective."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Placement:
    """Moves batches to `device` and runs collectives on tensors that are there."""

    def __init__(self, device: torch.device):
        self.device = indexed_device(device)
        self._recorders: List[List[Record]] = []

    def __repr__(self) -> str:
        return f"Placement({self.device})"

    # -- recording (tests) --
    @contextlib.contextmanager
    def recording(self) -> Iterator[List[Record]]:
        """Collect a Record for every tensor moved or handed to a collective inside the block."""
        records: List[Record] = []
        self._recorders.append(records)
        try:
            yield records
        finally:
            self._recorders.remove(records)

    def _record(self, what: str, tensor: torch.Tensor) -> None:
        for records in self._recorders:
            records.append((what, tensor.device, tuple(tensor.shape), tensor.data_ptr()))

    # -- batches and buffers --
    def to_device(self, value: Any) -> Any:
        """`value` with every tensor inside (dicts, lists, tuples, dataclasses) moved to the device."""
        if isinstance(value, torch.Tensor):
            moved = value.to(self.device, non_blocking=True)
            self._record("batch", moved)
            return moved
        if isinstance(value, dict):
            return type(value)((key, self.to_device(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self.to_device(item) for item in value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{field.name: self.to_device(getattr(value, field.name))
                                                 for field in dataclasses.fields(value) if field.init})
        return value

    def tensor(self, data, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return torch.as_tensor(data, dtype=dtype, device=self.device)

    def zeros(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=self.device)

    # -- collectives --
    def _check(self, what: str, tensor: torch.Tensor) -> None:
        self._record(what, tensor)
        if tensor.device != self.device:
            backend = dist.get_backend() if dist.is_initialized() else "none"
            raise DevicePlacementError(
                f"{what}: tensor on {tensor.device}, but the {backend} backend of this run exchanges "
                f"tensors on {self.device}: create it with Placement.zeros/tensor or move it with "
                "Placement.to_device")

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        self._check("all_reduce", tensor)
        dist.all_reduce(tensor, op=op, group=group)
        return tensor

    def all_gather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
        self._check("all_gather", tensor)
        for output in outputs:
            self._check("all_gather", output)
        dist.all_gather(list(outputs), tensor, group=group)

    def reduce_scatter(self, output: torch.Tensor, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """SUM of `tensor` [k * n, ...] over the group, this rank's n rows into `output` [n, ...]."""
        self._check("reduce_scatter", tensor)
        self._check("reduce_scatter", output)
        # torch 2.13 renamed reduce_scatter_tensor (now deprecated, with a warning per call)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(output, tensor, op=dist.ReduceOp.SUM, group=group)
        return output

    def broadcast(self, tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
        self._check("broadcast", tensor)
        dist.broadcast(tensor, src=src, group=group)
        return tensor

    def broadcast_object_list(self, objects: list, src: int, group=None) -> list:
        """torch's pickling broadcast, with its staging tensors on this device."""
        dist.broadcast_object_list(objects, src=src, group=group, device=self.device)
        return objects

    def all_gather_object(self, outputs: list, obj: Any, group=None) -> list:
        dist.all_gather_object(outputs, obj, group=group)
        return outputs


_placements: dict = {}


def current_placement() -> Placement:
    """The placement of this process's default process group (CPU when there is none)."""
    device = backend_device()
    key = str(device)
    if key not in _placements:
        _placements[key] = Placement(device)
    return _placements[key]

