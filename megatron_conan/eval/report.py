"""The end-to-end run's report: the held-out table and five PNG plots, with ``report.md`` beside them.

Inputs are the run directories' ``metrics.jsonl`` (training/README.md) and the evaluation rows of
``eval/stages.py``; matplotlib draws off-screen (Agg), so no display is needed.

    plots/loss.png            training loss of every stage against its step
    plots/soft_mask.png       a(t) during stage 3
    plots/dhnm.png            DHNM replacements per step and the mean hard-negative cosine (stage 4)
    plots/ndcg_by_stage.png   held-out nDCG@10 of every model against BM25 and random
    plots/matryoshka.png      held-out nDCG@10 of the final model against the embedding dim
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

from megatron_conan import atomic_write
from megatron_conan.data.jsonl import BadLineError, BadLineKind, iter_file_lines, parse_json_object
from megatron_conan.errors import DataError

logger = logging.getLogger(__name__)

STAGE_TITLES = {"pretrain": "1 pretrain", "sft": "2 SFT", "embed-weak": "3 embed-weak", "embed-sup": "4 embed-sup"}


def read_metrics(run_dir: str) -> List[dict]:
    """The records of a run's metrics.jsonl in step order (the last line of a step wins).

    A torn last line (a run killed while appending it: no newline at its end, or not JSON) is
    skipped with a warning; a bad line anywhere else is an error naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = list(iter_file_lines(path))
    by_step: Dict[int, dict] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            record = parse_json_object(raw, None)
            step = record["step"]
            if not isinstance(step, int):
                raise BadLineError(BadLineKind.NON_STRING_FIELD, f"step {step!r} is not an integer")
        except (BadLineError, KeyError) as error:
            if number == len(lines) and not raw.endswith(b"\n"):
                logger.warning("%s:%d: skipped the torn last line (%s): the run stopped while writing it",
                               path, number, error)
                continue
            raise DataError(f"{path}:{number}: not a metrics record ({error})") from None
        by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def _split_names(rows: List[dict]) -> List[str]:
    return list(rows[0]["splits"]) if rows else []


def format_table(rows: List[dict]) -> str:
    """The held-out table (plain text, also valid Markdown): nDCG@10 on every split, then Recall@10
    and MRR@10 on the last (test)."""
    splits = _split_names(rows)
    last = splits[-1] if splits else "test"
    header = [f"{split} nDCG@10" for split in splits] + [f"{last} Recall@10", f"{last} MRR@10"]
    lines = ["| model | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for row in rows:
        figures = [row["splits"][split]["ndcg_at_10"] for split in splits]
        figures += [row["splits"][last]["recall_at_10"], row["splits"][last]["mrr_at_10"]]
        lines.append(f"| {row['name']} | " + " | ".join(f"{value:.3f}" for value in figures) + " |")
    return "\n".join(lines)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: str) -> None:
    figure.tight_layout()
    with atomic_write.file(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)  # pyplot keeps every open figure otherwise


def _plot_losses(plt, runs: Dict[str, List[dict]], path: str) -> None:
    figure, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
    for axis, (stage, records) in zip(axes if len(runs) > 1 else [axes], runs.items()):
        tasks = sorted({r["task"] for r in records if r.get("task")})
        if tasks:  # stage 4: one series per task (their losses have different scales)
            for task in tasks:
                mine = [r for r in records if r.get("task") == task]
                axis.plot([r["step"] for r in mine], [r["loss"] for r in mine], linewidth=1, marker=".", label=task)
            axis.legend(fontsize="small")
        else:
            axis.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1)
        axis.set_title(STAGE_TITLES.get(stage, stage))
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
    _save(plt, figure, path)


def _plot_soft_mask(plt, records: List[dict], path: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot([r["step"] for r in records], [r.get("soft_mask_a") for r in records])
    axis.set_xlabel("stage-3 step")
    axis.set_ylabel("a(t)")
    axis.set_title("soft mask: causal (0) -> bidirectional (1)")
    _save(plt, figure, path)


def _plot_dhnm(plt, records: List[dict], path: str) -> None:
    observed = [r for r in records if "dhnm_replacements" in r]
    figure, left = plt.subplots(figsize=(6, 3.2))
    left.bar([r["step"] for r in observed], [r["dhnm_replacements"] for r in observed], color="tab:blue",
             label="replacements")
    left.set_xlabel("stage-4 step (retrieval steps)")
    left.set_ylabel("hard negatives replaced", color="tab:blue")
    right = left.twinx()
    scored = [r for r in observed if "dhnm_mean_score" in r]
    right.plot([r["step"] for r in scored], [r["dhnm_mean_score"] for r in scored], color="tab:red", marker=".")
    right.set_ylabel("mean hard-negative cosine", color="tab:red")
    left.set_title("dynamic hard-negative mining")
    _save(plt, figure, path)


def _plot_ndcg(plt, rows: List[dict], path: str) -> None:
    models = [row for row in rows if row["kind"] == "model"]
    splits = _split_names(rows)
    width = 0.8 / max(len(splits), 1)
    figure, axis = plt.subplots(figsize=(7, 3.4))
    colours = {"validation": "tab:olive", "test": "tab:green"}
    for i, split in enumerate(splits):
        axis.bar([m + (i - (len(splits) - 1) / 2) * width for m in range(len(models))],
                 [row["splits"][split]["ndcg_at_10"] for row in models], width=width,
                 color=colours.get(split), label=split)
    axis.set_xticks(range(len(models)))
    axis.set_xticklabels([row["name"] for row in models], rotation=15, ha="right")
    for row in (r for r in rows if r["kind"] == "baseline"):
        value = row["splits"][splits[-1]]["ndcg_at_10"]
        axis.axhline(value, linestyle="--" if row["name"] == "BM25" else ":", color="black", linewidth=1)
        axis.text(len(models) - 0.5, value, f" {row['name']} ({splits[-1]})", va="bottom", ha="right")
    axis.set_ylabel("held-out nDCG@10")
    axis.legend(fontsize="small", loc="upper left")
    _save(plt, figure, path)


def _plot_matryoshka(plt, curve: List[dict], rows: List[dict], path: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.2))
    splits = list(curve[0]["splits"]) if curve else []
    for split in splits:
        axis.plot([entry["dim"] for entry in curve], [entry["splits"][split]["ndcg_at_10"] for entry in curve],
                  marker="o", label=split)
    bm25 = next((row for row in rows if row["name"] == "BM25"), None)
    if bm25 is not None and splits:
        axis.axhline(bm25["splits"][splits[-1]]["ndcg_at_10"], linestyle="--", color="black", linewidth=1,
                     label=f"BM25 ({splits[-1]})")
    axis.legend(fontsize="small")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("embedding dim (Matryoshka prefix)")
    axis.set_ylabel("held-out nDCG@10")
    _save(plt, figure, path)


def write_report(work_dir: str, results: Dict[str, Any]) -> List[str]:
    """Draw the plots and write report.md into `work_dir`; returns the plot paths."""
    plt = _figure()
    plots_dir = os.path.join(work_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    runs = {stage: read_metrics(entry["run_dir"]) for stage, entry in results["stages"].items()}
    evaluation = results["evaluation"]
    written = []

    def target(name: str) -> str:
        written.append(os.path.join(plots_dir, name))
        return written[-1]

    _plot_losses(plt, runs, target("loss.png"))
    if "embed-weak" in runs:
        _plot_soft_mask(plt, runs["embed-weak"], target("soft_mask.png"))
    if "embed-sup" in runs:
        _plot_dhnm(plt, runs["embed-sup"], target("dhnm.png"))
    _plot_ndcg(plt, evaluation["rows"], target("ndcg_by_stage.png"))
    if evaluation.get("matryoshka"):
        _plot_matryoshka(plt, evaluation["matryoshka"], evaluation["rows"], target("matryoshka.png"))
    timings = results.get("timings", {})
    lines = ["# End-to-end run", "",
             "Held-out retrieval over " f"{evaluation['dataset']['documents']} documents of Python module "
             "families no training file contains (summary line -> the rest of the docstring); queries: "
             + ", ".join(f"{split} {count}" for split, count in evaluation["dataset"]["queries"].items())
             + " (disjoint families; choices are made on validation, test is only reported).", "",
             format_table(evaluation["rows"]), ""]
    if evaluation.get("matryoshka"):
        lines += ["Final model by Matryoshka dim (nDCG@10, " + " / ".join(evaluation["matryoshka"][0]["splits"])
                  + "): " + ", ".join(f"{entry['dim']}: " + " / ".join(
                      f"{metrics['ndcg_at_10']:.3f}" for metrics in entry["splits"].values())
                      for entry in evaluation["matryoshka"]), ""]
    lines += ["Plots:", ""] + [f"- ![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in written] + [""]
    if timings:
        lines += ["Time per step (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()), ""]
    atomic_write.text(os.path.join(work_dir, "report.md"), "\n".join(lines))
    return written
