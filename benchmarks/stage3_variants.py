"""Stage-3 variants of the main job, scored on the validation split: how its plan was chosen.

    python benchmarks/stage3_variants.py --work-dir runs/quickstart \\
        --variant steps360 '{"plan": {"weak_steps": 360}}' \\
        --variant no_cloze '{"plan": {"corpus": {"inverse_cloze_pairs": 0}}}' \\
        --variant from_random '{"init": "random"}' \\
        --variant from_random_emb03 '{"init": "random", "plan": {"model": {"embedding_init_method_std": 0.3}}}'

From a finished main job (its tokenizer and SFT checkpoint), each variant rebuilds the corpus with
the plan's corpus options (pairs may change; the held-out split and the tokenizer's text do not),
re-tokenizes, trains stage 3 with the plan's settings and any `plan` overrides (jobs.plan.Plan
fields; a `model` override is merged into the plan's model fields), and scores it on the
validation split with the query prompt. `"init": "random"` starts stage 3 from the untrained
weights (made with the variant's model fields) instead of SFT. The test split is not touched. A seed, as the
main job's ``--seed``, also re-draws the corpus and its held-out split. One run per variant and
seed; the table lists each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys

logger = logging.getLogger("stage3_variants")


def run_variant(args, name: str, variant: dict, seed: int) -> float:
    from megatron_conan.eval.stages import ModelUnderTest, evaluate_models, score
    from megatron_conan.jobs.pipeline import Pipeline
    from megatron_conan.jobs.plan import PLANS

    work = os.path.abspath(args.work_dir)
    directory = os.path.join(os.path.abspath(args.output_dir), f"{name}-seed{seed}")
    if os.path.exists(directory):
        raise SystemExit(f"stage3_variants: {directory} exists (a run of an earlier call): choose another --output-dir")
    changes = dict(variant.get("plan", {}))
    changes["model"] = {**PLANS[args.plan].model, **changes.get("model", {})}
    plan = dataclasses.replace(PLANS[args.plan], **changes)
    pipeline = Pipeline(directory, plan, seed)
    os.makedirs(directory)
    pipeline.corpus()
    shutil.copytree(os.path.join(work, "tokenizer"), pipeline.path("tokenizer"))  # the SFT model's tokenizer
    pipeline.use_tokenizer(pipeline.path("tokenizer", "pydoc.model"))
    pipeline.preprocess()
    if variant.get("init") == "random":
        pipeline.random_init()
        os.symlink(pipeline.path("random_init"), pipeline.path("sft"))
    else:
        os.symlink(os.path.join(work, "sft"), pipeline.path("sft"))
    pipeline.embed_weak()
    model = ModelUnderTest("embed-weak", pipeline.path("embed-weak", "checkpoints"), "query",
                           max_length=plan.max_passage_length,
                           query_instruction=pipeline.manifest["instructions"]["retrieval"])
    result = evaluate_models(pipeline.path("corpus", "heldout"), [model], baselines=(), splits=("validation",))
    value = score(result["rows"][0])
    logger.info("%s, seed %d: validation nDCG@10 %.4f", name, seed, value)
    return value


def main(argv=None) -> int:
    from megatron_conan.jobs.study import add_study_arguments, mean_std, start_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, "stage3_variants")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True,
                        help='a name and {"plan": {Plan fields}, "init": "sft" or "random"}')
    args = parser.parse_args(argv)
    if not start_study(args, "stage3_variants", "stage3_variants"):
        return 2
    try:
        variants = {name: json.loads(text) for name, text in args.variant}
    except json.JSONDecodeError as error:
        print(f"stage3_variants: a --variant is not JSON: {error}", file=sys.stderr)
        return 2
    results = {name: [run_variant(args, name, variant, seed) for seed in args.seeds]
               for name, variant in variants.items()}
    lines = [f"Stage 3, validation nDCG@10 (plan {args.plan}, seeds {list(args.seeds)}):", "",
             "| variant | overrides | nDCG@10 | per seed |", "|---|---|---|---|"]
    for name, values in results.items():
        lines.append(f"| {name} | `{json.dumps(variants[name])}` | {mean_std(values)} | "
                     + " ".join(f"{value:.4f}" for value in values) + " |")
    print("\n".join(lines))
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"variants": variants, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
