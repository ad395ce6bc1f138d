"""What tests record to show that a run never mixes devices: every tensor the model is fed, its
weights, and every batch and collective passing the placement seam (``distributed/device.py``).

    with recording_devices() as seen:
        train(cfg)
    assert seen.devices() == {placement.device}

Use it inside a ``run_distributed`` body (it patches the model class of that process only).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List, Set, Tuple

import torch


@dataclasses.dataclass
class SeenDevices:
    fed: List[Tuple[int, ...]] = dataclasses.field(default_factory=list)
    """Per model call: data_ptr of input_ids, position_ids and labels (those given)."""
    model: Set[torch.device] = dataclasses.field(default_factory=set)
    """Devices of the weights and of the tensors the model was called with."""
    records: list = dataclasses.field(default_factory=list)
    """The placement's Records (what, device, shape, data_ptr)."""

    def devices(self) -> Set[torch.device]:
        return self.model | {device for _, device, _, _ in self.records}

    def kinds(self) -> Set[str]:
        return {what for what, _, _, _ in self.records}

    def moved(self) -> Set[int]:
        return {pointer for what, _, _, pointer in self.records if what == "batch"}


@contextlib.contextmanager
def recording_devices() -> Iterator[SeenDevices]:
    """Record (see the module doc) for the body of the block, on this process's current placement."""
    from megatron.core.models.gpt import GPTModel

    from megatron_conan.distributed.device import current_placement

    seen = SeenDevices()
    original_forward = GPTModel.forward

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        given = [tensor for tensor in (input_ids, position_ids, kwargs.get("labels")) if tensor is not None]
        seen.fed.append(tuple(tensor.data_ptr() for tensor in given))
        seen.model.update(tensor.device for tensor in given)
        seen.model.update(parameter.device for parameter in self.parameters())
        return original_forward(self, input_ids, position_ids, attention_mask, *args, **kwargs)

    GPTModel.forward = forward
    try:
        with current_placement().recording() as records:
            yield seen
            seen.records = list(records)
    finally:
        GPTModel.forward = original_forward
