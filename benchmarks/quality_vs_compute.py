"""Quality against compute: the main job's embedding stages at several multiples of its steps, on validation.

    python benchmarks/quality_vs_compute.py --work-dir runs/quickstart [--multipliers 1 4 16]
        [--image docs/images/quality_vs_compute.png]

From a finished main job (``make quickstart``: its corpus, tokenizer, indexed data and SFT
checkpoint), each budget re-runs stage 3 (embed-weak), mining and stage 4 (embed-sup) with the
main job's plan and seed, the steps of both embedding stages multiplied (the learning-rate
schedule stretches with them: warm-up 5%, cosine to a tenth). Multiplier 1 is the main job itself
(its own stage-3 / stage-4 checkpoints are scored, not re-trained), and a budget whose directory
holds a finished run (an earlier call's) is scored as it is, so budgets can be added later. Every budget is scored on the
held-out **validation** split (nDCG@10): stage 3 and stage 4, beside BM25. The model chosen at the
largest budget (the stage with the better validation score there) is then scored on **test**, once;
no other test figure is computed.

Compute on the x axis is the embedding stages' model FLOPs: the tokens they trained (from each
run's ``metrics.jsonl``) times the trainer's FLOPs per token (``dry_run.model_flops_per_token`` at
the plan's sequence length, the figure the trainer's MFU uses). The language-model stages are shared
by every budget and not counted.

Output in ``--output-dir``: ``results.json``, ``table.md`` and the plot (also written to ``--image``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import List

logger = logging.getLogger("quality_vs_compute")

STAGES = ("embed-weak", "embed-sup")


def trained_tokens(run_dir: str) -> int:
    """Tokens a run trained, from its per-step ``metrics.jsonl`` (tokens/s times the step's seconds).
    A resumed run appends again from the step after its checkpoint: the last line of a step wins."""
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "tokens_per_s" in record:
                by_step[record["step"]] = record
    total = 0.0
    previous = 0
    for step in sorted(by_step):
        record = by_step[step]
        samples = record["consumed_samples"] - previous
        previous = record["consumed_samples"]
        total += record["tokens_per_s"] * samples / record["samples_per_s"]
    return int(round(total))


SAVE_INTERVAL = 250
"""Steps between the checkpoints of a budget's stages: a budget stopped part-way (hours at 16x on a
CPU) continues from its last one when the study is run again, and resumes exactly."""


def _trained_steps(run_dir: str) -> int:
    """The step of the run's ``latest`` checkpoint (0 when it has none)."""
    from megatron_conan.checkpoint.layout import ITER_RE, read_latest

    latest = read_latest(os.path.join(run_dir, "checkpoints"))
    match = ITER_RE.match(os.path.basename(latest)) if latest else None
    return int(match.group(1)) if match else 0


def _budget_pipeline(args, multiplier: float):
    """A Pipeline for this budget: the main job's own (1x) or a directory of its own sharing the main
    job's data, whose stages save every SAVE_INTERVAL steps and continue where a stopped run left off."""
    from megatron_conan.jobs.plan import PLANS
    from megatron_conan.jobs.study import study_pipeline

    base = PLANS[args.plan]
    if multiplier == 1.0:
        return study_pipeline(args.work_dir, os.path.abspath(args.work_dir), base, args.seed, {})
    directory = os.path.join(os.path.abspath(args.output_dir), f"x{multiplier:g}")
    saving = {"checkpoint.save_interval": SAVE_INTERVAL}
    pipeline = study_pipeline(args.work_dir, directory, base, args.seed, {"embed-weak": saving, "embed-sup": saving})
    pipeline.plan = dataclasses.replace(base, weak_steps=max(1, round(base.weak_steps * multiplier)),
                                        sup_steps=max(1, round(base.sup_steps * multiplier)))
    # a spawned world is ended as hung after this long: scale the 1x limit with the steps
    pipeline.stage_timeout_s = max(pipeline.stage_timeout_s, pipeline.stage_timeout_s * multiplier)
    return pipeline


def _train_budget(pipeline, multiplier: float) -> None:
    """Train what this budget still lacks: stage 3 to its steps, then (after mining with the finished
    stage-3 model, unless the stage-4 run has started on its mined store) stage 4 to its steps."""
    plan = pipeline.plan
    weak, sup = _trained_steps(pipeline.path("embed-weak")), _trained_steps(pipeline.path("embed-sup"))
    if (weak, sup) == (plan.weak_steps, plan.sup_steps):
        logger.info("x%g: scoring the finished budget in %s (not re-trained)", multiplier, pipeline.work_dir)
        return
    if weak or sup:
        logger.info("x%g: continuing from stage 3 step %d of %d, stage 4 step %d of %d", multiplier, weak,
                    plan.weak_steps, sup, plan.sup_steps)
    if weak < plan.weak_steps:
        pipeline.embed_weak()
    if not sup:
        pipeline.mine()
    pipeline.embed_sup()


def _models(pipeline):
    from megatron_conan.eval.stages import ModelUnderTest

    instruction = pipeline.manifest["instructions"]["retrieval"]
    return {stage: ModelUnderTest(stage, pipeline.path(stage, "checkpoints"), "query",
                                  max_length=pipeline.plan.max_passage_length, query_instruction=instruction)
            for stage in STAGES}


def run_budget(args, multiplier: float) -> dict:
    from megatron_conan.config.model import tiny
    from megatron_conan.eval.stages import evaluate_models, score
    from megatron_conan.training.dry_run import model_flops_per_token

    pipeline = _budget_pipeline(args, multiplier)
    if multiplier != 1.0:
        _train_budget(pipeline, multiplier)
    models = _models(pipeline)
    result = evaluate_models(pipeline.path("corpus", "heldout"), list(models.values()), baselines=("bm25",),
                             splits=("validation",))
    rows = {row["name"]: row for row in result["rows"]}
    model = dataclasses.replace(tiny(), **{**pipeline.plan.model, "vocab_size": pipeline.vocab_size})
    flops_per_token = model_flops_per_token(model, pipeline.plan.seq_length)
    tokens = {stage: trained_tokens(pipeline.path(stage)) for stage in STAGES}
    entry = {"multiplier": multiplier, "weak_steps": pipeline.plan.weak_steps, "sup_steps": pipeline.plan.sup_steps,
             "tokens": tokens, "flops": flops_per_token * sum(tokens.values()),
             "validation": {stage: score(rows[stage]) for stage in STAGES}, "bm25_validation": score(rows["BM25"]),
             "work_dir": pipeline.work_dir}
    logger.info("x%g: %.3g FLOPs, validation nDCG@10 stage 3 %.4f, stage 4 %.4f (BM25 %.4f)", multiplier,
                entry["flops"], entry["validation"]["embed-weak"], entry["validation"]["embed-sup"],
                entry["bm25_validation"])
    entry["_models"] = models
    return entry


def test_once(entry: dict) -> dict:
    """Test nDCG@10 of the stage chosen on validation at this budget: the only test figure computed."""
    from megatron_conan.eval.stages import evaluate_models, score

    chosen = max(STAGES, key=lambda stage: entry["validation"][stage])
    result = evaluate_models(os.path.join(entry["work_dir"], "corpus", "heldout"), [entry["_models"][chosen]],
                             baselines=("bm25",), splits=("test",))
    rows = {row["name"]: row for row in result["rows"]}
    return {"multiplier": entry["multiplier"], "stage": chosen, "test_ndcg_at_10": score(rows[chosen], "test"),
            "bm25_test_ndcg_at_10": score(rows["BM25"], "test")}


def format_table(budgets: List[dict], test: dict) -> str:
    lines = ["| budget | stage-3 / stage-4 steps | embedding-stage FLOPs | validation nDCG@10 stage 3 | "
             "stage 4 | BM25 |", "|---|---|---|---|---|---|"]
    for entry in budgets:
        lines.append(f"| {entry['multiplier']:g}x | {entry['weak_steps']} / {entry['sup_steps']} | "
                     f"{entry['flops']:.3g} | {entry['validation']['embed-weak']:.4f} | "
                     f"{entry['validation']['embed-sup']:.4f} | {entry['bm25_validation']:.4f} |")
    lines += ["", f"Test, once, for the model chosen on validation at {test['multiplier']:g}x "
                  f"({test['stage']}): nDCG@10 {test['test_ndcg_at_10']:.4f} (BM25 {test['bm25_test_ndcg_at_10']:.4f})."]
    return "\n".join(lines)


def plot(budgets: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    flops = [entry["flops"] for entry in budgets]
    labels = {"embed-weak": "stage 3 (embed-weak)", "embed-sup": "stage 4 (embed-sup)"}
    for stage in STAGES:
        axes.plot(flops, [entry["validation"][stage] for entry in budgets], marker="o", label=labels[stage])
    axes.axhline(budgets[0]["bm25_validation"], color="grey", linestyle="--", label="BM25")
    for entry in budgets:
        axes.annotate(f"{entry['multiplier']:g}x", (entry["flops"], entry["validation"]["embed-sup"]),
                      textcoords="offset points", xytext=(4, -12))
    axes.set_xscale("log")
    axes.set_xlabel("embedding-stage training compute (model FLOPs)")
    axes.set_ylabel("validation nDCG@10")
    axes.set_title("Held-out validation nDCG@10 against training compute")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _save(args, budgets: List[dict], test, table) -> None:
    public = [{key: value for key, value in entry.items() if key != "_models"} for entry in budgets]
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"seed": args.seed, "plan": args.plan, "budgets": public, "test": test, "table": table},
                  handle, indent=2)


def main(argv=None) -> int:
    from megatron_conan.jobs.study import add_study_arguments, start_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "quality_vs_compute")
    parser.add_argument("--seed", type=int, default=0, help="the main job's seed (its --seed)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1, 4, 16],
                        help="budgets as multiples of the main job's embedding-stage steps (1: the main job itself)")
    parser.add_argument("--image", default=None, help="also write the plot here")
    args = parser.parse_args(argv)
    if not start_study(args, "quality_vs_compute", "quality_vs_compute"):
        return 2
    if any(not value > 0 for value in args.multipliers):
        print("quality_vs_compute: --multipliers must be positive", file=sys.stderr)  # user-facing
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    budgets: List[dict] = []
    for multiplier in sorted(set(args.multipliers)):
        budgets.append(run_budget(args, multiplier))
        _save(args, budgets, None, None)  # each budget is kept as soon as it is scored
    test = test_once(budgets[-1])
    table = format_table(budgets, test)
    print(table)
    _save(args, budgets, test, table)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    for path in [os.path.join(args.output_dir, "quality_vs_compute.png")] + ([args.image] if args.image else []):
        plot(budgets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
