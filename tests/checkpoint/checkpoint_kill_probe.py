"""The pretrain entry point with a save-point hook that SIGKILLs the run's whole process group at a
named point of its N-th checkpoint save, as a scheduler's kill would land there:

    python tests/checkpoint/checkpoint_kill_probe.py POINT N -- <pretrain arguments>

POINT is one of megatron_conan.checkpoint.save.SAVE_POINTS; saves are counted from 1 within this process.
"""

import os
import signal
import sys

from megatron_conan.checkpoint import save as saving
from megatron_conan.training.pretrain import main


def _install(point: str, save_number: int) -> None:
    if point not in saving.SAVE_POINTS:
        raise SystemExit(f"unknown save point {point!r}; known: {saving.SAVE_POINTS}")
    saves = {"started": 0}

    def hook(reached: str, directory: str) -> None:
        if reached == "before_shards":
            saves["started"] += 1
        if reached == point and saves["started"] == save_number:
            sys.stderr.write(f"probe: SIGKILL at {point} of save {save_number} ({directory})\n")
            sys.stderr.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)

    saving.save_point_hook = hook


if __name__ == "__main__":
    point, number, separator, *arguments = sys.argv[1:]
    assert separator == "--", "usage: checkpoint_kill_probe.py POINT N -- <pretrain arguments>"
    _install(point, int(number))
    raise SystemExit(main(arguments))
