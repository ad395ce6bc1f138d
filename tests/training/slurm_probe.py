"""`python -m tests.training.slurm_probe`: the target launch_rank.sh starts in test_slurm.py.

Forms a gloo world from torch's env:// variables, all-reduces its rank and prints one JSON line
with the variables it saw and the sum, so the test can check the SLURM -> torch mapping end to end.
"""

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def main() -> None:
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=30))
    try:
        total = torch.tensor([dist.get_rank()], dtype=torch.int64)
        dist.all_reduce(total)
        report = {name: os.environ[name] for name in ENV_NAMES}
        report["rank_sum"] = int(total.item())
        print(json.dumps(report), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
