"""Tiny end-to-end run on CPU: the README's first command.

Builds the `tiny` Conan model, splits it with tensor parallelism 2 over two local processes (gloo),
and trains a few steps on a fixed synthetic batch, printing the parameter count, the layout and the
losses. Later stages of the pipeline extend this script as they land.
"""

from __future__ import annotations

import argparse
import logging

from megatron_conan.testing.distributed import run_distributed

logger = logging.getLogger("megatron_conan.quickstart")


def _train_tiny(rank: int, world_size: int, steps: int, tensor_parallel: int) -> list:
    from megatron_conan.config.model import ParallelConfig, build_transformer_config, tiny
    from megatron_conan.distributed.parallel import describe_layout, initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.testing.parity import MICRO_BATCH, SEQ_LENGTH, data_parallel_microbatches, synthetic_lm_batch
    from megatron_conan.training.lm_step import lm_forward_step
    from megatron_conan.training.step import build_optimizer, train_step, wrap_model

    model_config = tiny()
    parallel = ParallelConfig(tensor_parallel=tensor_parallel)
    initialize_model_parallel(parallel, seed=1234)
    transformer_config = build_transformer_config(model_config, parallel)
    chunks = wrap_model(build_model_chunks(model_config, transformer_config), transformer_config)
    optimizer = build_optimizer(chunks, transformer_config, lr=3e-3, weight_decay=0.001)
    logger.info("%s", describe_layout())
    if rank == 0:
        built = sum(p.numel() * (tensor_parallel if getattr(p, "tensor_model_parallel", False) else 1)
                    for p in chunks[0].parameters())
        logger.info("tiny Conan model: %s parameters (closed form %s)",
                    f"{built:,}", f"{model_config.num_parameters(tensor_parallel):,}")
    batch = synthetic_lm_batch(model_config)
    losses = []
    for step in range(1, steps + 1):
        microbatches = data_parallel_microbatches(batch)
        result = train_step(lm_forward_step, iter(microbatches), chunks, optimizer,
                            num_microbatches=len(microbatches), seq_length=SEQ_LENGTH,
                            micro_batch_size=MICRO_BATCH)
        losses.append(result.loss)
        if rank == 0:
            logger.info("step %d  loss %.4f  grad norm %.3f", step, result.loss, result.grad_norm)
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    losses = run_distributed(_train_tiny, args.tensor_parallel, args=(args.steps, args.tensor_parallel))[0]
    print(f"tiny TP={args.tensor_parallel} run: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    if not losses[-1] < losses[0]:
        print("loss did not fall")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
