"""What every stage entry point does: parse ``--config recipe.yaml`` + ``key=value`` overrides,
then either print the ``--dry-run`` report or train. Entry modules stay a few lines long.

SIGTERM / SIGUSR1 are handled before anything else (:mod:`megatron_conan.stop_signals`): this module
imports only what the command line needs, the config and training stack come later, inside the
command, so that a SLURM time-limit signal during start-up ends the run cleanly instead of killing it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_conan import stop_signals
from megatron_conan.console import command_parser, configure_logging, run_command

if TYPE_CHECKING:
    from megatron_conan.config.run import RunConfig
    from megatron_conan.training.dry_run import PlanningAssumptions


def parse_run_config(stage: str, argv: Optional[Sequence[str]], prog: Optional[str] = None,
                     description: Optional[str] = None):
    """(arguments, the config of stage id `stage`) from a stage's command line."""
    # pydantic (through the config and the dry run's defaults): after the signal handling
    from megatron_conan.config.run import load_run_config
    from megatron_conan.training.dry_run import DEFAULT_FS_GBPS, DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

    parser = command_parser(prog, description or f"the {stage} stage")
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print layout, batch, token budget, parameters and memory per GPU; no training")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs to plan for with --dry-run (default: WORLD_SIZE or 1)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"--dry-run: model FLOPs utilisation the time figures assume (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"--dry-run: peak dense TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g}, H100 SXM bf16)")
    parser.add_argument("--fs-gbps", type=float, default=DEFAULT_FS_GBPS,
                        help=f"--dry-run: GB/s the job's checkpoint writes get (default {DEFAULT_FS_GBPS:g})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4 train.train_steps=1000")
    args = parser.parse_args(argv)
    cfg = load_run_config(stage, args.config, args.overrides)
    return args, cfg


def dry_run_text(cfg: "RunConfig", world_size: int, stage: str = "pretrain",
                 assumptions: Optional["PlanningAssumptions"] = None) -> str:
    """The --dry-run report: pure arithmetic, nothing is allocated; the stage's config checks run."""
    from megatron_conan.training.dry_run import dry_run_report, format_dry_run
    from megatron_conan.training.stage_registry import build_stage  # the training stack: see _run_stage

    plugin = build_stage(stage)
    plugin.check_config(cfg)
    batch = plugin.describe_batch(cfg, world_size)
    text = format_dry_run(dry_run_report(
        cfg.model.build(), cfg.parallel, world_size,
        global_batch_size=cfg.train.global_batch_size, micro_batch_size=batch.micro_batch_size,
        seq_length=cfg.train.seq_length, precision=cfg.train.precision, recompute=cfg.train.recompute,
        token_budget=cfg.train.token_budget, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        assumptions=assumptions, save_interval=cfg.checkpoint.save_interval,
    ))
    return text if batch.description is None else f"{text}\n{batch.description}"


def run_stage(description: str, stage: str, argv: Optional[Sequence[str]] = None) -> int:
    """A stage's command line; bad input (config, files, checkpoints) ends in one line and status 2.
    SIGTERM / SIGUSR1 are handled from here on: before the process group exists a signal exits at
    once with status 0, after it the trainer stops every rank together (saving if it had stepped)."""
    # named as the console script, whether started as conan-<stage>, python -m or torchrun
    prog = f"conan-{stage}"
    return run_command(lambda args: _run_stage(description, stage, prog, args), argv, prog=prog, log_level=None,
                       handle_stop_signals=True)


def _run_stage(description: str, stage: str, prog: str, argv: Optional[Sequence[str]]) -> int:
    args, cfg = parse_run_config(stage, argv, prog=prog, description=description)
    if args.dry_run:
        from megatron_conan.training.dry_run import PlanningAssumptions

        assumptions = PlanningAssumptions(mfu=args.mfu, peak_tflops=args.peak_tflops, fs_gbps=args.fs_gbps)
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run_text(cfg, world_size, stage, assumptions))  # user-facing
        return 0
    configure_logging(logging.INFO, f"[rank {os.environ.get('RANK', '0')}] %(name)s: %(message)s", logging.INFO)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # megatron-core's import warns (no Transformer Engine / Apex): imported here, after run_main has
    # installed the known-warning filters, so that a bad-input run stays one line
    from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env
    from megatron_conan.training.trainer import train

    init_process_group_from_env(timeout_s=cfg.parallel.timeout_s)
    stop_signals.stop_together()  # one rank leaving alone now would fail the others' collectives
    try:
        result = train(cfg, stage)
    finally:
        destroy_parallel()
    if result.preempted:
        logging.getLogger(stage).info("stopped by a signal at step %d; a restart resumes from there", result.steps_done)
    else:
        logging.getLogger(stage).info("done: %d steps", result.steps_done)
    return 0
