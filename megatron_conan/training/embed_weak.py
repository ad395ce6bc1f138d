"""Stage 3: weakly-supervised embedding training on (query, positive) pairs, with in-batch negatives
gathered across data-parallel ranks, while the soft mask moves attention from causal to
bidirectional; starts from the SFT checkpoint given as checkpoint.load_dir.

    torchrun --nproc-per-node 8 -m megatron_conan.training.embed_weak --config examples/conan_1p4b/embed_weak.yaml
"""

from megatron_conan.training.stage_main import run_stage


def main(argv=None) -> int:
    return run_stage(__doc__.splitlines()[0], "embed-weak", argv)


if __name__ == "__main__":
    raise SystemExit(main())
