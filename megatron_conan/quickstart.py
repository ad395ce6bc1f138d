"""Tiny end-to-end run on CPU: the README's first command (``make quickstart``).

Walks the pipeline as a user would, with the project's own tools and entry points, on data it
generates (no downloads):

1. synthetic multilingual JSONL: four pretraining sources (news, qa, web, multilingual) and SFT
2. ``tools/train_tokenizer.py``: a small SentencePiece BPE model
3. ``tools/preprocess_data.py``: each source -> .bin/.idx (2 workers); SFT -> indexed SFT data
4. ``conan-pretrain``: the tiny model on the blended sources, TP=2 over two local processes (gloo)
5. ``conan-sft``: fine-tunes the pretrained checkpoint on the SFT data (loss on outputs only)

Stages 3-4 of the paper (embedding training) join this run as they land.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

from megatron_conan.distributed.spawn import run_distributed

logger = logging.getLogger("megatron_conan.quickstart")

SOURCES = ("news", "qa", "web", "multilingual")


def _train_stage(rank: int, world_size: int, module: str, argv: list) -> dict:
    """run_distributed body: one stage entry point's training on this rank."""
    from megatron_conan.training.entry import parse_run_config
    from megatron_conan.training.loop import train

    _, cfg = parse_run_config(module, argv)
    result = train(cfg, stage=module)
    return {"losses": result.losses, "steps": result.steps_done}


def prepare_data(work_dir: str, vocab_size: int = 1000) -> dict:
    """Steps 1-3: corpora, tokenizer, indexed datasets. Returns the paths."""
    from megatron_conan.data import synthetic
    from tools import preprocess_data, train_tokenizer

    raw = os.path.join(work_dir, "raw")
    indexed = os.path.join(work_dir, "indexed")
    os.makedirs(raw, exist_ok=True)
    os.makedirs(indexed, exist_ok=True)
    for seed, source in enumerate(SOURCES):
        synthetic.write_pretraining_jsonl(os.path.join(raw, f"{source}.jsonl"), num_docs=400,
                                          sources=(source,), seed=seed)
    synthetic.write_sft_jsonl(os.path.join(raw, "sft.jsonl"), num_examples=200)
    tokenizer_prefix = os.path.join(work_dir, "tokenizer", "conan_tiny")
    os.makedirs(os.path.dirname(tokenizer_prefix), exist_ok=True)
    status = train_tokenizer.main(["--input", *[os.path.join(raw, f"{s}.jsonl") for s in SOURCES],
                                   "--model-prefix", tokenizer_prefix, "--vocab-size", str(vocab_size)])
    if status != 0:
        raise RuntimeError(f"train_tokenizer failed with status {status}")
    tokenizer = tokenizer_prefix + ".model"
    for source in SOURCES:
        status = preprocess_data.main(["--input", os.path.join(raw, f"{source}.jsonl"), "--output-prefix",
                                       os.path.join(indexed, source), "--tokenizer-model", tokenizer,
                                       "--workers", "2", "--no-progress"])
        if status != 0:
            raise RuntimeError(f"preprocess_data failed on {source} with status {status}")
    status = preprocess_data.main(["--format", "sft", "--input", os.path.join(raw, "sft.jsonl"),
                                   "--output-prefix", os.path.join(indexed, "sft"), "--tokenizer-model",
                                   tokenizer, "--workers", "1", "--no-progress"])
    if status != 0:
        raise RuntimeError(f"preprocess_data --format sft failed with status {status}")
    return {"tokenizer": tokenizer, "indexed": indexed, "vocab_size": vocab_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/quickstart")
    parser.add_argument("--pretrain-steps", type=int, default=30)
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if os.path.exists(args.work_dir):
        shutil.rmtree(args.work_dir)  # a fresh run each time: resuming is what the tests check
    data = prepare_data(args.work_dir)
    tokenizer, indexed = data["tokenizer"], data["indexed"]
    blend = json.dumps({"sources": [{"name": s, "prefix": os.path.join(indexed, s), "weight": w}
                                    for s, w in zip(SOURCES, (0.25, 0.15, 0.45, 0.15))],
                        "split": "98,2,0", "cache_dir": os.path.join(args.work_dir, "index_cache")})
    common = [f"model.overrides={{vocab_size: {data['vocab_size']}}}", f"data.tokenizer={tokenizer}",
              f"parallel.tensor_parallel={args.tensor_parallel}", "train.log_interval=5"]
    pretrain_dir = os.path.join(args.work_dir, "pretrain")
    pretrain = run_distributed(_train_stage, args.tensor_parallel, args=("pretrain", [
        "--config", "examples/tiny/pretrain.yaml", f"run_dir={pretrain_dir}", "data.kind=blended",
        f"data.blend={blend}", f"train.train_steps={args.pretrain_steps}", "train.eval_interval=10",
        *common]), timeout_s=1800)[0]
    sft = run_distributed(_train_stage, args.tensor_parallel, args=("sft", [
        "--config", "examples/tiny/sft.yaml", f"run_dir={os.path.join(args.work_dir, 'sft')}",
        f"checkpoint.load_dir={os.path.join(pretrain_dir, 'checkpoints')}",
        f"data.sft_prefix={os.path.join(indexed, 'sft')}", f"train.train_steps={args.sft_steps}",
        "optimizer.lr=1e-3", *common]), timeout_s=1800)[0]
    first, last = pretrain["losses"][1], pretrain["losses"][args.pretrain_steps]
    print(f"pretrain (tiny, TP={args.tensor_parallel}, blended indexed data): loss {first:.3f} -> {last:.3f} "
          f"over {pretrain['steps']} steps")
    print(f"sft (from the pretrained checkpoint, output tokens only): loss {sft['losses'][1]:.3f} -> "
          f"{sft['losses'][args.sft_steps]:.3f} over {sft['steps']} steps")
    print(f"everything is under {args.work_dir}/ (TensorBoard: {pretrain_dir}/tensorboard)")
    if not last < first:
        print("pretraining loss did not fall")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
