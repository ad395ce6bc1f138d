"""The data sections of the run configs: what a stage reads, one dataclass per kind.

Pretraining and SFT take ``LanguageModelData``, a union chosen by the section's ``kind``
(``blended``, ``sft``, ``synthetic``; a section that names no kind is synthetic); the embedding
stages take ``ContrastiveData``. ``BlendedDataConfig`` is the blend of ``kind: blended`` (and what
``data/pretraining.py`` builds megatron-core's datasets from):

    data:
      kind: blended
      tokenizer: runs/tokenizer/conan.model
      blend:
        sources: [{prefix: data/web, weight: 0.7}, {prefix: data/code, weight: 0.3}]
        split: 98,1,1
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import Discriminator, Field, Tag, model_validator

from megatron_conan.config.loader import config_dataclass, from_dict, read_recipe, to_dict


@config_dataclass("sources[]")
class DataSource:
    """One source of the blend."""

    prefix: Annotated[str, Field(min_length=1)]
    """Indexed dataset path prefix (without .bin/.idx)."""
    weight: Annotated[float, Field(gt=0)] = 1.0
    """Relative sampling weight; weights are normalised over the sources."""
    name: Optional[str] = None
    """Label for logs (news, qa, web, multilingual...); defaults to the prefix."""

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = self.prefix


@config_dataclass()
class BlendedDataConfig:
    """The pretraining data blend."""

    sources: Annotated[List[DataSource], Field(min_length=1)]
    """Sources and their weights."""
    split: str = "98,1,1"
    """Train/valid/test proportions of each source's documents."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its document/sample/shuffle and blending indices (None: rebuilt
    every time, in memory)."""
    seed: int = 1234
    """Seed of every shuffle and of the blend."""
    reset_position_ids: bool = False
    """Restart position ids after each EOD (documents packed in one sample stay separate in RoPE).
    Attention still spans the documents packed in a sample: Megatron-LM's `reset_attention_mask`
    is not offered, since our attention takes only causal, key-padding or soft masks."""
    eod_mask_loss: bool = False
    """Do not train on predicting the EOD token."""
    mmap_bin_files: bool = True
    """Memory-map the .bin files (else read with file pointers)."""
    num_dataset_builder_threads: int = 1
    """Threads megatron-core uses to build the per-source datasets."""

    @model_validator(mode="after")
    def _split_is_three_numbers(self) -> "BlendedDataConfig":
        try:
            values = [float(part) for part in self.split.replace("/", ",").split(",")]
        except ValueError:
            values = []
        if len(values) != 3 or any(value < 0 for value in values) or sum(values) <= 0:
            raise ValueError(f"split must be three non-negative numbers like '98,1,1', got {self.split!r}")
        return self

    @classmethod
    def from_dict(cls, values: Dict[str, Any], path: str = "") -> "BlendedDataConfig":
        """Typed build from a mapping (see config/loader.py); errors name keys under `path`."""
        return from_dict(cls, values, path)

    @classmethod
    def from_yaml(cls, path: str) -> "BlendedDataConfig":
        """Reads the config from a YAML mapping; a top-level `data:` key is also accepted."""
        values = read_recipe(path)
        if set(values) == {"data"}:
            values = values["data"]
        return cls.from_dict(values)

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @property
    def blend(self) -> Tuple[List[str], List[float]]:
        return [source.prefix for source in self.sources], [source.weight for source in self.sources]


@config_dataclass("data")
class BlendedData:
    """Pretraining data: indexed datasets blended by weight."""

    kind: Literal["blended"] = "blended"
    tokenizer: Optional[str] = None
    """SentencePiece model path (the model's vocab_size must match it)."""
    blend: Optional[BlendedDataConfig] = None
    """The sources and their weights, split, cache and seed (required)."""

    @model_validator(mode="after")
    def _has_a_blend(self) -> "BlendedData":
        if self.blend is None:
            raise ValueError("blend is required for kind=blended")
        return self


@config_dataclass("data")
class SFTData:
    """SFT data: one indexed dataset of prompt/response documents with their loss masks."""

    kind: Literal["sft"] = "sft"
    tokenizer: Optional[str] = None
    """SentencePiece model path (the model's vocab_size must match it)."""
    sft_prefix: Optional[str] = None
    """Indexed SFT data prefix (required)."""
    split: str = "98,2,0"
    """train,valid,test split of the documents."""


@config_dataclass("data")
class SyntheticData:
    """Random tokens, no files (smoke runs, benchmarks)."""

    kind: Literal["synthetic"] = "synthetic"
    tokenizer: Optional[str] = None
    """Not read by synthetic data (a recipe can switch kinds with one override)."""


@config_dataclass("data")
class ContrastiveData:
    """The embedding stages' data: a contrastive store (conan-tokenize-contrastive)."""

    kind: Literal["contrastive"] = "contrastive"
    tokenizer: Optional[str] = None
    """SentencePiece model path (the model's vocab_size must match it)."""
    contrastive_prefix: Optional[str] = None
    """Contrastive store prefix (required)."""


def data_kind(value: Any) -> Optional[str]:
    """The variant a data section names; a section that names none is synthetic (the section's default)."""
    return value.get("kind", "synthetic") if isinstance(value, dict) else getattr(value, "kind", None)


LanguageModelData = Annotated[Union[Annotated[BlendedData, Tag("blended")], Annotated[SFTData, Tag("sft")],
                                    Annotated[SyntheticData, Tag("synthetic")]],
                              Discriminator(data_kind)]
"""The data section of pretraining and SFT, chosen by ``kind``."""
