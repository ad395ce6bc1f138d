"""Stage 2: LLM supervised fine-tuning; the loss covers the output tokens only (the SFT dataset's
loss mask), starting from the pretrained checkpoint given as checkpoint.load_dir.

    torchrun --nproc-per-node 8 -m megatron_conan.training.sft --config examples/conan_1p4b/sft.yaml
"""

from megatron_conan.training.stage_main import run_stage


def main(argv=None) -> int:
    return run_stage(__doc__.splitlines()[0], "sft", argv)


if __name__ == "__main__":
    raise SystemExit(main())
