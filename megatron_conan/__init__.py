"""megatron_conan: the Conan-Embedding-v2 training system on megatron-core.

Stages: pretrain -> LLM SFT -> weakly-supervised embedding (soft mask) -> supervised embedding.
See README.md for the stage-by-stage guide and docs/DESIGN.md for the design.
"""

__version__ = "0.1.0"
