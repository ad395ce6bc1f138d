"""Ablations of the embedding stages on the main job's validation split, several seeds each.

    python benchmarks/ablations.py --work-dir runs/quickstart [--seeds 0 1 2] [--variants ...]

From a finished main job (``make quickstart``: its corpus, tokenizer, indexed data and SFT
checkpoint), each variant re-runs what it changes with the main job's plan and a training seed
(``train.seed = 1234 + seed``), then scores stage 3 and stage 4 on the validation split (nDCG@10):

  default               the main job: soft mask a(t) 0 -> 1 in stage 3, DHNM and Matryoshka in stage 4,
                        instruction left out of the pooled mean
  abrupt switch         stage 3 bidirectional from its first step (a = 1 throughout)
  causal only           both stages causal (a = 0 throughout), as the decoder was trained
  DHNM off              stage 4 keeps the mined negatives it starts with (stage 3 and mining shared
                        with default)
  Matryoshka off        stage 4's loss at the full width only (shared as above)
  instruction in mean   both stages, mining and evaluation pool the instruction with the query

Stage-3 variants re-run stage 3, mining and stage 4; stage-4 variants re-use the default's stage 3
and mined negatives of the same seed. The test split is not touched. Output: a Markdown table of
mean +- std per variant and stage, and ``results.json``, in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List

logger = logging.getLogger("ablations")

VARIANTS: Dict[str, Dict[str, Dict[str, object]]] = {
    "default": {},
    "abrupt switch": {"embed-weak": {"model.soft_mask.fixed_a": 1.0}},
    "causal only": {"embed-weak": {"model.soft_mask.fixed_a": 0.0}, "embed-sup": {"model.soft_mask.fixed_a": 0.0}},
    "DHNM off": {"embed-sup": {"embedding.dhnm.enabled": False}},
    "Matryoshka off": {"embed-sup": {"embedding.matryoshka_dims": []}},
    "instruction in mean": {"embed-weak": {"embedding.pool_prompt": True}, "embed-sup": {"embedding.pool_prompt": True}},
}
STAGE4_ONLY = ("DHNM off", "Matryoshka off")


def _validation(pipeline, stages: List[str]) -> Dict[str, float]:
    from megatron_conan.eval.stages import ModelUnderTest, evaluate_models, score

    instruction = pipeline.manifest["instructions"]["retrieval"]
    models = [ModelUnderTest(stage, pipeline.path(stage, "checkpoints"), "query",
                             max_length=pipeline.plan.max_passage_length, query_instruction=instruction)
              for stage in stages]
    result = evaluate_models(pipeline.path("corpus", "heldout"), models, baselines=(), splits=("validation",))
    return {row["name"]: score(row) for row in result["rows"]}


def run_variant(args, name: str, seed: int) -> Dict[str, float]:
    from megatron_conan.jobs.plan import PLANS
    from megatron_conan.jobs.study import study_pipeline

    output = os.path.abspath(args.output_dir)
    directory = os.path.join(output, f"{name.replace(' ', '_')}-seed{seed}")
    if os.path.exists(directory):
        raise SystemExit(f"ablations: {directory} exists (a run of an earlier call): choose another --output-dir")
    pipeline = study_pipeline(args.work_dir, directory, PLANS[args.plan], seed, VARIANTS[name])
    if name in STAGE4_ONLY:
        # the default's stage 3 and the negatives it mined, for this seed
        default = os.path.join(output, f"default-seed{seed}")
        os.symlink(os.path.join(default, "embed-weak"), pipeline.path("embed-weak"))
        for folder in ("corpus", "indexed"):
            for entry in os.listdir(os.path.join(default, folder)):
                if not os.path.lexists(pipeline.path(folder, entry)):
                    os.symlink(os.path.join(default, folder, entry), pipeline.path(folder, entry))
    else:
        pipeline.embed_weak()
        pipeline.mine()
    pipeline.embed_sup()
    scores = _validation(pipeline, ["embed-weak", "embed-sup"])
    logger.info("%s, seed %d: validation nDCG@10 stage 3 %.4f, stage 4 %.4f", name, seed,
                scores["embed-weak"], scores["embed-sup"])
    return scores


def format_table(results: Dict[str, List[Dict[str, float]]], args) -> str:
    from megatron_conan.jobs.study import mean_std

    lines = [f"Validation nDCG@10, mean +- std over seeds {list(args.seeds)} (plan {args.plan}).", "",
             "| variant | stage 3 (embed-weak) | stage 4 (embed-sup) |", "|---|---|---|"]
    for name, runs in results.items():
        cells = [mean_std([run[stage] for run in runs]) for stage in ("embed-weak", "embed-sup")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron_conan.jobs.study import add_study_arguments, start_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "ablations")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    if not start_study(args, "ablations", "ablations"):
        return 2
    names = [name for name in VARIANTS if name in args.variants]
    if any(name in STAGE4_ONLY for name in names) and "default" not in names:
        names.insert(0, "default")  # the stage-4 variants re-use its stage 3 and mined negatives
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            results[name].append(run_variant(args, name, seed))
    table = format_table(results, args)
    print(table)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"seeds": args.seeds, "plan": args.plan, "results": results, "table": table}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
