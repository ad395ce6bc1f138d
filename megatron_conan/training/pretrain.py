"""Stage 1: pretraining on blended indexed data (next-token cross-entropy).

    torchrun --nproc-per-node 8 -m megatron_conan.training.pretrain --config examples/conan_1p4b/pretrain.yaml
"""

from megatron_conan.training.stage_main import run_stage


def main(argv=None) -> int:
    return run_stage(__doc__.splitlines()[0], "pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
