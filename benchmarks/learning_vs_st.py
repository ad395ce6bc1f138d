"""Does our stage 3 learn as well as sentence-transformers' trainer, from the same weights on the same data?

    python benchmarks/learning_vs_st.py --work-dir runs/quickstart [--seeds 0 1 2] [--steps 120]

Takes a finished main job (``make quickstart``: its corpus, tokenizer and SFT checkpoint) and trains
stage 3 three ways from the SFT weights, each for every seed:

  ours, soft mask     the embed-weak stage as the main job runs it: a(t) 0 -> 1 over the run
  ours, abrupt        the same stage bidirectional from the first step (fixed a = 1)
  sentence-transformers  ``MultipleNegativesRankingLoss`` (and ``CachedMultipleNegativesRankingLoss``
                      with ``--mini-batch-size``) on the SFT weights exported bidirectional

Everything but the trainer is shared: the initial weights, the pairs and their order (both read the
batches of one ``ContrastiveLoader`` with the seed, so both see the same token ids: the export's
tokenizer is ours), the batch, the temperature (scale = 1 / temperature), AdamW with the same betas,
epsilon and weight decay (not on norms), the LR schedule (ours, warm-up then cosine to lr / 10, no
update at lr 0), gradient clipping and the steps. Both run as one process with the same intra-op
threads (ours is a one-rank world, which `run_distributed` gives the machine's cores divided by its
ranks; sentence-transformers runs in this process, torch's default: the cores), and ours trains as
the main job does, texts packed in rows (`embedding.packing`). The pairs are the main
job's stage-3 pairs with their instructions removed: sentence-transformers applies one prompt per
batch column, not per row, so the comparison uses raw queries on both sides (and queries are then
evaluated without a prompt). Each model is scored on the validation split (nDCG@10, pytrec_eval);
the table gives mean +- std over the seeds, then each side's training time end to end (launch to
saved model) and in its steps alone, with pairs per second of each, and the CPU seconds of the
training process (ours: the rank's whole run; theirs: its steps), which a loaded machine inflates
less than wall time (``--variants`` runs a subset).
The test split is not touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List

logger = logging.getLogger("learning_vs_st")

VARIANTS = ("ours, soft mask", "ours, abrupt", "sentence-transformers MNRL")


def _stage3_values(args, work: str, run_dir: str, store: str, seed: int, soft_mask: dict) -> dict:
    """The main job's stage-3 config at one data-parallel rank (same global batch)."""
    return {
        "run_dir": run_dir,
        "model": {"recipe": "tiny", "overrides": {**args.plan.model, "vocab_size": args.vocab_size},
                  "soft_mask": soft_mask},
        "train": {"train_steps": args.steps, "global_batch_size": args.batch, "seq_length": args.plan.seq_length,
                  "log_interval": 10, "eval_interval": 0, "seed": seed},
        "optimizer": {"lr": args.lr, "warmup_fraction": 0.05, "min_lr": args.lr / 10, "clip_grad": args.clip_grad},
        "checkpoint": {"save_interval": 0, "keep_last": 1, "load_dir": os.path.join(work, "sft", "checkpoints")},
        "data": {"kind": "contrastive", "contrastive_prefix": store,
                 "tokenizer": os.path.join(work, "tokenizer", "pydoc.model")},
        "embedding": {"temperature": args.temperature, "max_query_length": args.plan.max_query_length,
                      "max_passage_length": args.plan.max_passage_length, "mini_batch_size": args.mini_batch_size,
                      # as the main job trains: texts packed back to back in rows (0 in the plan: padded)
                      "packing": args.plan.max_tokens_per_row > 0,
                      "max_tokens_per_row": max(args.plan.max_tokens_per_row, 1)},
    }


def _train_ours(rank: int, world_size: int, values: dict) -> dict:
    """The stage as its entry point runs it; returns the seconds of `train` (build, load, steps,
    save) and the threads the rank computed with."""
    import torch

    from megatron_conan.config.run import run_config_from_dict
    from megatron_conan.training.trainer import train

    started, cpu_started = time.perf_counter(), time.process_time()
    train(run_config_from_dict("embed-weak", values), stage="embed-weak")
    return {"train_call_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
            "threads": torch.get_num_threads()}


def step_seconds(run_dir: str) -> float:
    """Seconds our run spent in its optimizer steps (each step's samples / samples per second, from
    ``metrics.jsonl``): the loop alone, without start-up, checkpoint loading or saving."""
    total, previous = 0.0, 0
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "samples_per_s" in record:
                total += (record["consumed_samples"] - previous) / record["samples_per_s"]
                previous = record["consumed_samples"]
    return total


def _uninstructed_store(work: str, output_dir: str) -> str:
    """The main job's stage-3 pairs without instructions, tokenized into a store."""
    from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
    from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig

    source = os.path.join(output_dir, "pairs_raw.jsonl")
    with open(os.path.join(work, "corpus", "pairs.jsonl"), encoding="utf-8") as pairs, \
            open(source, "w", encoding="utf-8") as out:
        for line in pairs:
            row = json.loads(line)
            row.pop("instruction", None)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    prefix = os.path.join(output_dir, "pairs_raw")
    tokenize_contrastive(PreprocessConfig(inputs=[source], output_prefix=prefix,
                                          tokenizer_model=os.path.join(work, "tokenizer", "pydoc.model"),
                                          workers=1, progress=False))
    return prefix


def _train_sentence_transformers(args, work: str, store: str, export_dir: str, output: str, seed: int) -> dict:
    """MNRL (or CachedMNRL) over the batches our loader draws with `seed`, with our schedule; returns
    the seconds of its steps and the threads it computed with."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from megatron_conan.config.loader import from_dict
    from megatron_conan.data.contrastive import ContrastiveLoader
    from megatron_conan.data.tokenizer import ConanTokenizer
    from megatron_conan.config.run import OptimizerSection
    from megatron_conan.training.trainer import build_scheduler

    torch.manual_seed(seed)
    model = SentenceTransformer(export_dir, device="cpu", local_files_only=True)
    model.train()
    scale = 1.0 / args.temperature
    loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=args.mini_batch_size)
            if args.mini_batch_size else losses.MultipleNegativesRankingLoss(model, scale=scale))
    decay = [p for p in model.parameters() if p.dim() >= 2]  # megatron-core: no decay on norms and biases
    rest = [p for p in model.parameters() if p.dim() < 2]
    section = from_dict(OptimizerSection, {"lr": args.lr, "warmup_fraction": 0.05, "min_lr": args.lr / 10}, "optimizer")
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": section.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                                  betas=(section.adam_beta1, section.adam_beta2), eps=section.adam_eps)
    scheduler = build_scheduler(optimizer, section, args.steps)
    loader = ContrastiveLoader(store, ConanTokenizer(os.path.join(work, "tokenizer", "pydoc.model")), args.batch,
                               seed=seed, max_query_length=args.plan.max_query_length,
                               max_passage_length=args.plan.max_passage_length, tasks=["pair"], drop_last=True)

    def features(ids, lengths):
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}

    batches = iter(loader)
    loop_started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        batch = next(batches)
        optimizer.zero_grad()
        value = loss([features(batch.query_ids, batch.query_lengths),
                      features(batch.positive_ids, batch.positive_lengths)], labels=None)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        scheduler.step(increment=1)
    loop_s, cpu_s = time.perf_counter() - loop_started, time.process_time() - cpu_started
    model.save(output)
    return {"loop_s": loop_s, "cpu_s": cpu_s, "threads": torch.get_num_threads()}


def _validation_ndcg(work: str, model_path: str, max_length: int) -> float:
    from megatron_conan.eval.stages import ModelUnderTest, evaluate_models, score

    options = {} if os.path.isfile(os.path.join(model_path, "modules.json")) else {"max_length": max_length}
    result = evaluate_models(os.path.join(work, "corpus", "heldout"),
                             [ModelUnderTest("model", model_path, "none", **options)],
                             baselines=(), splits=("validation",))
    return score(result["rows"][0])


def run(args) -> Dict[str, List[dict]]:
    from megatron_conan.conversion.export import export_sentence_transformer
    from megatron_conan.data.tokenizer import ConanTokenizer
    from megatron_conan.distributed.spawn import run_distributed

    work, output_dir = os.path.abspath(args.work_dir), os.path.abspath(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    args.vocab_size = ConanTokenizer(os.path.join(work, "tokenizer", "pydoc.model")).vocab_size
    store = _uninstructed_store(work, output_dir)
    export_dir = os.path.join(output_dir, "sft_bidirectional")
    export_sentence_transformer(os.path.join(work, "sft", "checkpoints"), export_dir, overwrite=True,
                                max_seq_length=args.plan.max_passage_length, bidirectional_from_causal=True)
    results: Dict[str, List[dict]] = {variant: [] for variant in args.variants}
    soft = {"schedule": "linear", "position_scale": "len_over_pos"}
    for seed in args.seeds:
        for variant in args.variants:
            path = os.path.join(output_dir, f"variant{VARIANTS.index(variant)}-seed{seed}")
            if os.path.exists(path):
                raise SystemExit(f"learning_vs_st: {path} exists (a run of an earlier call): choose another "
                                 "--output-dir")
            started = time.perf_counter()
            if variant.startswith("ours"):
                mask = soft if variant == "ours, soft mask" else {"fixed_a": 1.0, "position_scale": "len_over_pos"}
                timing = run_distributed(_train_ours, 1, args=(_stage3_values(args, work, path, store, seed, mask),),
                                         timeout_s=3600, log_level=logging.WARNING)[0]
                timing["loop_s"] = step_seconds(path)
                model_path = os.path.join(path, "checkpoints")
            else:
                timing = _train_sentence_transformers(args, work, store, export_dir, path, seed)
                model_path = path
            seconds = time.perf_counter() - started
            ndcg = _validation_ndcg(work, model_path, args.plan.max_passage_length)
            pairs = args.steps * args.batch
            results[variant].append({"seed": seed, "ndcg_at_10": ndcg, "train_s": seconds, **timing,
                                     "pairs_per_s": pairs / seconds, "loop_pairs_per_s": pairs / timing["loop_s"]})
            logger.info("seed %d, %s: validation nDCG@10 %.4f, %.0f s end to end (%.0f s in steps), %d threads",
                        seed, variant, ndcg, seconds, timing["loop_s"], timing["threads"])
    return results


def format_results(results: Dict[str, List[dict]], args) -> str:
    """The quality table, then the time table: end to end (launch to saved model: process start,
    model build, weight loading, steps, save) and the steps alone, with pairs per second of each."""
    from megatron_conan.jobs.study import mean_std

    lines = [f"Stage 3 from the same SFT weights and pairs: {args.steps} steps, batch {args.batch}, lr {args.lr}, "
             f"temperature {args.temperature}, clip {args.clip_grad}, GradCache chunks "
             f"{args.mini_batch_size or 'off'}, ours packed in rows of {args.plan.max_tokens_per_row} tokens; "
             f"seeds {list(args.seeds)}; validation split.", "",
             "| trainer | validation nDCG@10 (mean +- std) | per seed | threads | train s end to end | pairs/s | "
             "s in steps | pairs/s in steps | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        scores = [run["ndcg_at_10"] for run in runs]
        mean = {key: statistics.mean(run[key] for run in runs)
                for key in ("train_s", "pairs_per_s", "loop_s", "loop_pairs_per_s", "cpu_s")}
        lines.append(f"| {variant} | {mean_std(scores)} | " + " ".join(f"{value:.4f}" for value in scores)
                     + f" | {runs[0]['threads']} | {mean['train_s']:.0f} | {mean['pairs_per_s']:.1f} | "
                       f"{mean['loop_s']:.0f} | {mean['loop_pairs_per_s']:.1f} | {mean['cpu_s']:.0f} |")
    ours, theirs = results.get("ours, soft mask"), results.get(VARIANTS[-1])
    if ours and theirs:
        ratio = {key: statistics.mean(run[key] for run in ours) / statistics.mean(run[key] for run in theirs)
                 for key in ("pairs_per_s", "loop_pairs_per_s")}
        lines += ["", f"ours (soft mask) / sentence-transformers, pairs/s: {ratio['pairs_per_s']:.2f}x end to end, "
                      f"{ratio['loop_pairs_per_s']:.2f}x in steps"]
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron_conan.jobs.plan import PLANS
    from megatron_conan.jobs.study import add_study_arguments, start_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "learning_vs_st")
    parser.add_argument("--steps", type=int, default=None, help="default: the plan's stage-3 steps")
    parser.add_argument("--batch", type=int, default=None, help="default: the plan's stage-3 batch")
    parser.add_argument("--lr", type=float, default=None, help="default: the plan's stage-3 lr")
    parser.add_argument("--temperature", type=float, default=None, help="default: the plan's")
    parser.add_argument("--clip-grad", type=float, default=None, help="default: the plan's")
    parser.add_argument("--mini-batch-size", type=int, default=0,
                        help="GradCache chunks for ours and CachedMNRL for sentence-transformers (0: plain)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which trainers to run (default: all three)")
    args = parser.parse_args(argv)
    if not start_study(args, "learning_vs_st", "learning_vs_st"):
        return 2
    args.plan = PLANS[args.plan]
    args.steps = args.steps or args.plan.weak_steps
    args.batch = args.batch or args.plan.weak_batch
    args.lr = args.lr or args.plan.weak_lr
    args.temperature = args.temperature or args.plan.temperature
    args.clip_grad = args.clip_grad if args.clip_grad is not None else args.plan.clip_grad
    results = run(args)
    table = format_results(results, args)
    print(table)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"args": {key: value for key, value in vars(args).items() if key != "plan"},
                   "results": results, "table": table}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
