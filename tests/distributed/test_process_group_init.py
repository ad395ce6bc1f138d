"""Starting a process group never binds a port it picked earlier: a world of one rendezvous in
process, and run_distributed's rendezvous port stays bound from the moment the OS picks it."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A world of one started, torn down and started again in one process (the quickstart's stages and
# conversions do this). Between the two, another process takes the port the first start published
# in MASTER_PORT, as another test's gloo world may at any time: the second start must not need it.
SCRIPT = """
import os, socket
import torch.distributed as dist
from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env

init_process_group_from_env()
destroy_parallel()
taken = socket.socket()
taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
taken.bind(("127.0.0.1", int(os.environ.get("MASTER_PORT", "0"))))
taken.listen()
init_process_group_from_env()
print("world of", dist.get_world_size())
destroy_parallel()
"""


def test_a_world_of_one_restarts_while_its_old_port_is_taken():
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("world of 1")
