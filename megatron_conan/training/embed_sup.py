"""Stage 4: supervised multi-task embedding training (retrieval and cross-lingual retrieval with hard
negatives chosen by dynamic hard-negative mining, classification, CoSENT for STS), Matryoshka over
the embedding dims, bidirectional attention; starts from the stage-3 checkpoint.

    torchrun --nproc-per-node 8 -m megatron_conan.training.embed_sup --config examples/conan_1p4b/embed_sup.yaml
"""

from megatron_conan.training.stage_main import run_stage


def main(argv=None) -> int:
    return run_stage(__doc__.splitlines()[0], "embed-sup", argv)


if __name__ == "__main__":
    raise SystemExit(main())
