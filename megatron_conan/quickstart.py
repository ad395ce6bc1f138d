"""The main job (``make quickstart``): all four stages end to end on real text, on CPU, in minutes.

    python -m megatron_conan.quickstart [--work-dir runs/quickstart] [--plan full|quick]

From Python's own documentation (``datagen/pydoc/``: nothing is downloaded, nothing else of the
machine is read) to an embedding model, with the project's own library at every step:

 1. corpora: pretraining text, SFT triples, stage-3 pairs, stage-4 retrieval / STS / classification
    data and a held-out retrieval split (whole module families the training never sees), BEIR layout
 2. tokenizer: SentencePiece BPE with byte fallback on the pretraining text
 3. preprocessing: pretraining text and SFT to indexed datasets (2 workers), pairs to a store
 4. pretrain: a small Conan decoder on two blended sources (docstrings, and the SFT examples as
    plain text), tensor parallelism 2 over two local processes
 5. SFT from the pretrained checkpoint (loss on the answers only)
 6. embed-weak (stage 3) from the SFT checkpoint: gathered InfoNCE over two data-parallel ranks while
    the soft mask moves attention from causal to bidirectional
 7. hard negatives for the retrieval data, mined with the stage-3 model (ranks 1-2 skipped)
 8. embed-sup (stage 4) from the stage-3 checkpoint: retrieval with DHNM hard negatives,
    classification, STS with CoSENT, Matryoshka
 9. export of the stage-4 model as a sentence-transformers directory
10. evaluation on the held-out split: every model (the pretrained and SFT decoders mean-pooled as
    they are, stage 3, stage 4 from its checkpoint and from the export) beside BM25 and random;
    nDCG@10 against the Matryoshka dim
11. plots and ``report.md`` in the work directory

Every step prints one line; long steps show a progress bar. The run needs no working directory of
its own: recipes are built here, tools are called as library functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from megatron_conan.jobs.pipeline import STEPS, Pipeline
from megatron_conan.jobs.plan import PLANS, plan_with
from megatron_conan.jobs.workspace import claim_work_dir, set_up_console


def run(pipeline: Pipeline) -> None:
    """Every step in order, one line each (its summary and seconds), then the held-out table."""
    started = time.perf_counter()
    for number, name in enumerate(STEPS, 1):
        step = name.replace("_", "-")
        step_started = time.perf_counter()
        summary = getattr(pipeline, name)()
        elapsed = time.perf_counter() - step_started
        pipeline.results["timings"][step] = elapsed
        print(f"[{number:>2}/{len(STEPS)}] {step}: {summary} ({elapsed:.0f} s)", flush=True)  # user-facing
    pipeline.results["timings"]["total"] = time.perf_counter() - started
    from megatron_conan.eval.report import format_table

    # user-facing: the job's result table and where its report is
    print("", flush=True)
    print(format_table(pipeline.results["evaluation"]["rows"]), flush=True)
    print(f"\ntotal {pipeline.results['timings']['total'] / 60:.1f} min; report: "
          f"{os.path.join(pipeline.work_dir, 'report.md')}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/quickstart")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full",
                        help="full: the README's run (about 8 minutes on 2 cores); quick: the same steps, tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change the plan for a study: weak_steps=360, model.embedding_init_method_std=0.02 "
                             "(docs/LEARNING.md names the runs made this way)")
    args = parser.parse_args(argv)
    set_up_console(logging.WARNING)
    try:
        plan = plan_with(PLANS[args.plan], args.set)
    except ValueError as error:
        print(f"quickstart: error: {error}", file=sys.stderr)  # user-facing: one line, nothing touched
        return 2
    problem = claim_work_dir(args.work_dir)
    if problem:
        print(f"quickstart: error: {problem}", file=sys.stderr)  # user-facing: one line, nothing touched
        return 2
    run(Pipeline(args.work_dir, plan, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
