import numpy
import pytest
import torch
import yaml

from megatron_conan.config.data import BlendedDataConfig, DataSource
from megatron_conan.data.pretraining import build_pretrain_datasets
from megatron_conan.datagen import synthetic
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl

WEIGHTS = {"news": 0.1, "qa": 0.2, "web": 0.3, "multilingual": 0.4}


@pytest.fixture(scope="module")
def source_prefixes(tmp_path_factory, tokenizer_model):
    directory = tmp_path_factory.mktemp("blend")
    prefixes = {}
    for index, name in enumerate(WEIGHTS):
        path = directory / f"{name}.jsonl"
        synthetic.write_pretraining_jsonl(str(path), num_docs=120, sources=[name], seed=index)
        preprocess_jsonl(PreprocessConfig([str(path)], str(directory / name), tokenizer_model,
                                          progress=False))
        prefixes[name] = str(directory / name)
    return prefixes


def _config(prefixes, cache_dir, seed=5):
    return BlendedDataConfig(
        sources=[DataSource(prefix, WEIGHTS[name], name) for name, prefix in prefixes.items()],
        split="90,5,5", cache_dir=str(cache_dir) if cache_dir else None, seed=seed)


def test_shares_follow_weights(source_prefixes, tokenizer, tmp_path):
    train, valid, test = build_pretrain_datasets(_config(source_prefixes, tmp_path / "cache"),
                                                 tokenizer, seq_length=32,
                                                 num_samples=(10_000, 100, 100))
    assert len(train) == 10_000 and len(valid) == 100 and len(test) == 100
    shares = numpy.bincount(numpy.asarray(train.dataset_index), minlength=4) / len(train)
    for share, weight in zip(shares, WEIGHTS.values()):
        assert abs(share - weight) <= 0.02
    sample = train[0]
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].shape == (32,) and torch.equal(sample["tokens"][1:],
                                                           sample["labels"][:-1])
    assert any((tmp_path / "cache").iterdir())  # index caches written


def _draw(dataset, count=300):
    return [dataset[index]["tokens"] for index in range(0, len(dataset), len(dataset) // count)]


def test_same_seed_same_samples_and_cache_reuse(source_prefixes, tokenizer, tmp_path):
    first = build_pretrain_datasets(_config(source_prefixes, tmp_path / "a"), tokenizer, 32,
                                    (2000, 50, 50))[0]
    second = build_pretrain_datasets(_config(source_prefixes, tmp_path / "b"), tokenizer, 32,
                                     (2000, 50, 50))[0]
    cached = build_pretrain_datasets(_config(source_prefixes, tmp_path / "a"), tokenizer, 32,
                                     (2000, 50, 50))[0]
    no_cache = build_pretrain_datasets(_config(source_prefixes, None), tokenizer, 32,
                                       (2000, 50, 50))[0]
    other_seed = build_pretrain_datasets(_config(source_prefixes, None, seed=6), tokenizer, 32,
                                         (2000, 50, 50))[0]
    reference = _draw(first)
    for dataset in (second, cached, no_cache):
        assert all(torch.equal(a, b) for a, b in zip(reference, _draw(dataset)))
    assert not all(torch.equal(a, b) for a, b in zip(reference, _draw(other_seed)))


def test_yaml_config(source_prefixes, tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"data": {
        "sources": [{"prefix": prefix, "weight": WEIGHTS[name], "name": name}
                    for name, prefix in source_prefixes.items()],
        "split": "98,1,1", "cache_dir": str(tmp_path / "cache"), "seed": 9}}))
    config = BlendedDataConfig.from_yaml(str(path))
    assert [source.name for source in config.sources] == list(WEIGHTS)
    assert config.blend[1] == list(WEIGHTS.values()) and config.seed == 9


@pytest.mark.parametrize("bad,field", [({"sources": []}, "sources"),
                                       ({"sources": [{"prefix": "x", "weight": 0}]}, "weight"),
                                       ({"sources": [{"prefix": "x"}], "split": "1,2"}, "split"),
                                       ({"sources": [{"prefix": "x"}], "typo": 1}, "typo")])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        BlendedDataConfig.from_dict(bad)


def test_missing_source_is_reported(tokenizer, tmp_path):
    config = BlendedDataConfig(sources=[DataSource(str(tmp_path / "nothing"), 1.0, "web")])
    with pytest.raises(FileNotFoundError, match="web"):
        build_pretrain_datasets(config, tokenizer, 32, (10, 1, 1))


def test_builds_inside_a_process_group(source_prefixes, tokenizer, tmp_path):
    """With a process group, megatron-core's own rank logic runs (rank 0 builds, others load)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)
    try:
        train = build_pretrain_datasets(_config(source_prefixes, tmp_path / "cache"), tokenizer,
                                        32, (500, 10, 10))[0]
        assert len(train) == 500
    finally:
        torch.distributed.destroy_process_group()
