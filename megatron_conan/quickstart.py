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
import copy
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from megatron_conan.console import configure_logging, set_offline_switches
from megatron_conan.warning_filters import silence_known_warnings

logger = logging.getLogger("megatron_conan.quickstart")


@dataclasses.dataclass
class Plan:
    """How big every step is. `full` is the README's main job (about 8 minutes on 2 CPU cores);
    `quick` is the same pipeline in a minute or two (the test)."""

    corpus: Dict[str, Any]
    """PydocCorpusConfig fields."""
    vocab_size: int
    model: Dict[str, Any]
    """ConanModelConfig overrides of the `tiny` recipe (vocab_size follows the tokenizer)."""
    pretrain_steps: int
    sft_steps: int
    weak_steps: int
    sup_steps: int
    seq_length: int
    lm_batch: int
    weak_batch: int
    """Pairs per step over both DP ranks."""
    sup_batches: Dict[str, int]
    """Per-rank batch size per stage-4 task."""
    num_negatives: int
    num_candidates: int
    matryoshka_dims: List[int]
    max_query_length: int
    max_passage_length: int
    pretrain_lr: float = 3e-3
    """Peak learning rate of pretraining (cosine to a tenth of it)."""
    sft_lr: float = 3e-4
    """Peak learning rate of SFT (linear to a tenth of it)."""
    weak_lr: float = 1e-3
    sup_lr: float = 2e-4
    temperature: float = 0.05
    clip_grad: float = 10.0
    """Gradient-norm clip of the embedding stages. Their norms run 4-7 after the first steps, so a
    clip of 1 (the pretraining default) rescaled every step; a clip of 10 (only the first steps'
    norms of ~35 are cut) did better on validation (docs/LEARNING.md section 3)."""
    sup_task_weights: Dict[str, float] = dataclasses.field(
        default_factory=lambda: {"retrieval": 6.0, "classification": 1.0, "sts": 1.0})
    max_tokens_per_row: int = 128
    """The embedding stages train on packed rows of this many tokens (`embedding.packing`: texts back
    to back, attention within each text) instead of padding each text to its batch's longest; 0
    pads. As wide as the longest passage: on the CPU's SDPA a row costs width^2 attention whatever
    it holds. On this data a stage-3 step runs 1.68x faster packed (docs/PERFORMANCE.md)."""


PLANS = {
    "full": Plan(
        corpus={}, vocab_size=4096,
        # Word embeddings drawn wide (std 0.3) and untied from the output layer: the residual stream
        # starts as a bag of distinct token vectors, which the held-out task (mostly word matching)
        # rewards, and the language-model head keeps the usual small init (tied, the wide table
        # made the first logits so large that LM loss started at 37 and stayed above uniform).
        model={"hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 32,
               "ffn_hidden_size": 352, "num_layers": 4, "max_sequence_length": 256,
               "embedding_init_method_std": 0.3, "tie_embeddings": False},
        # chosen on the validation split (docs/LEARNING.md section 3): the language-model stages kept
        # short and gentle (at lr 3e-3 for 250 steps they overwrite the words and stage 3 cannot
        # bring them back), the time they free goes to contrastive steps, passages cut at 128 tokens
        pretrain_steps=100, pretrain_lr=3e-4, sft_steps=20, weak_steps=420, sup_steps=80, seq_length=256,
        lm_batch=16, weak_batch=64, sup_batches={"retrieval": 16, "classification": 16, "sts": 32}, num_negatives=3,
        num_candidates=8, matryoshka_dims=[16, 32, 64, 128], max_query_length=64, max_passage_length=128),
    "quick": Plan(
        corpus={"heldout_documents": 120, "max_heldout_queries": 40, "max_sft_examples": 200,
                "max_pair_examples": 200, "max_retrieval_examples": 120, "max_mining_corpus": 300,
                "max_sts_anchors": 40, "classification_labels": 4, "max_classification_per_label": 20},
        vocab_size=1000,
        model={"max_sequence_length": 128},
        pretrain_steps=4, sft_steps=2, weak_steps=3, sup_steps=4, seq_length=64, lm_batch=8,
        weak_batch=16, sup_batches={"retrieval": 4, "classification": 4, "sts": 8}, num_negatives=2,
        num_candidates=3, matryoshka_dims=[16, 32, 64], max_query_length=32, max_passage_length=64),
}


WORK_DIR_MARKER = ".megatron_conan_quickstart"
"""The file that makes a directory the quickstart's own: only such a directory (or an empty one) is replaced."""


def claim_work_dir(path: str) -> Optional[str]:
    """Make `path` a fresh work directory carrying the marker, or return why it may not be touched.

    A directory the quickstart made (it has the marker, also after an interrupted run) is replaced;
    a missing or empty one is used; anything else is the user's and stays as it is."""
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            return f"--work-dir {path} exists and is not a directory; choose another --work-dir"
        entries = os.listdir(path)
        if entries and WORK_DIR_MARKER not in entries:
            return (f"--work-dir {path} holds {len(entries)} entries the quickstart did not make (no "
                    f"{WORK_DIR_MARKER} marker); it replaces only its own work directory: choose another "
                    "--work-dir or empty this one")
        if entries:
            shutil.rmtree(path)  # a fresh run each time: resuming is what the tests check
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, WORK_DIR_MARKER), "w", encoding="utf-8") as handle:
        handle.write("made by python -m megatron_conan.quickstart; the next run replaces this directory\n")
    return None


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def layout_for_host(world_size: int, values: dict, gpus: int) -> Tuple[int, dict]:
    """A stage's world and run config as this host runs them. Without GPUs, as planned: CPU ranks
    over gloo. With a GPU per rank, as planned over NCCL. With fewer GPUs than the plan's ranks, one
    rank on one GPU (TP=1, DP=1): rather than the whole world on the CPU (README "Parallel
    layouts"). The global batch stays: the per-rank task batches of stage 4 grow by the lost DP."""
    if gpus == 0 or gpus >= world_size:
        return world_size, values
    values = copy.deepcopy(values)
    parallel = values.setdefault("parallel", {})
    data_parallel = world_size // (parallel.get("tensor_parallel", 1) * parallel.get("pipeline_parallel", 1))
    parallel.update(tensor_parallel=1, pipeline_parallel=1)
    embedding = values.get("embedding", {})
    if embedding.get("task_batch_sizes"):
        embedding["task_batch_sizes"] = {task: size * data_parallel for task, size in embedding["task_batch_sizes"].items()}
    return 1, values


def _train_stage(rank: int, world_size: int, stage: str, values: dict) -> dict:
    """run_distributed body: one stage's training on this rank."""
    from megatron_conan.config.run import run_config_from_dict
    from megatron_conan.distributed.device import current_placement
    from megatron_conan.training.trainer import train

    result = train(run_config_from_dict(stage, values), stage=stage)
    return {"losses": result.losses, "steps": result.steps_done, "device": str(current_placement().device)}


class Pipeline:
    """The steps of the main job over one work directory (module docstring)."""

    gpus: Optional[int] = None
    """GPUs to fit each stage's layout to (None: those present; 1 puts every stage on one rank)."""

    def __init__(self, work_dir: str, plan: Plan, seed: int = 0,
                 overrides: Optional[Dict[str, Dict[str, Any]]] = None):
        self.work_dir, self.plan, self.seed = os.path.abspath(work_dir), plan, seed
        self.overrides = overrides or {}
        """Per stage, dotted ``key: value`` config overrides on top of the plan (the ablations use them)."""
        self.paths: Dict[str, str] = {}
        self.results: Dict[str, Any] = {"plan": dataclasses.asdict(plan), "stages": {}, "timings": {}}
        self.step_count = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.work_dir, *parts)

    def say(self, text: str) -> None:
        print(text, flush=True)  # user-facing: one line per step

    def timed(self, name: str, function, *args):
        started = time.perf_counter()
        summary = function(*args)
        elapsed = time.perf_counter() - started
        self.results["timings"][name] = elapsed
        self.step_count += 1
        self.say(f"[{self.step_count:>2}/11] {name}: {summary} ({elapsed:.0f} s)")

    # -- data --
    def corpus(self) -> str:
        from megatron_conan.datagen.pydoc.config import PydocCorpusConfig
        from megatron_conan.datagen.pydoc.write import build_pydoc_corpus

        manifest = build_pydoc_corpus(self.path("corpus"), PydocCorpusConfig(seed=self.seed, **self.plan.corpus))
        self.manifest = manifest
        files = {name: info["lines"] for name, info in manifest["files"].items()}
        self.results["corpus"] = {"python": manifest["python"], "files": files, "counts": manifest["counts"],
                                  "modules": {key: manifest["modules"][key] for key in ("imported", "skipped")}}
        python = manifest["python"]
        version = python.get("version", "?") if isinstance(python, dict) else python
        return (f"Python {version} docs ({manifest['modules']['imported']} modules imported, "
                f"{manifest['modules']['skipped']} skipped) -> "
                f"{files.get('pretrain.jsonl')} pretraining texts, {files.get('sft.jsonl')} SFT, "
                f"{files.get('pairs.jsonl')} pairs, {files.get('retrieval.jsonl')} retrieval, held out: "
                f"{files.get('heldout/queries.jsonl')} queries over {files.get('heldout/corpus.jsonl')} documents")

    def tokenizer(self) -> str:
        from megatron_conan.data.tokenizer import ConanTokenizer, TokenizerTrainingConfig, train_tokenizer

        prefix = self.path("tokenizer", "pydoc")
        train_tokenizer([self.path("corpus", "pretrain.jsonl")], prefix,
                        TokenizerTrainingConfig(vocab_size=self.plan.vocab_size, num_threads=2, seed=self.seed))
        self.paths["tokenizer"] = prefix + ".model"
        self.vocab_size = ConanTokenizer(self.paths["tokenizer"]).vocab_size
        return f"{self.vocab_size} SentencePiece BPE pieces with byte fallback"

    def _sft_as_text(self) -> str:
        """The SFT examples as plain documents: the second pretraining source of the blend."""
        from megatron_conan.preprocess.encoders import format_sft_prompt

        path = self.path("corpus", "sft_as_text.jsonl")
        with open(self.path("corpus", "sft.jsonl"), encoding="utf-8") as source, \
                open(path, "w", encoding="utf-8") as out:
            for line in source:
                row = json.loads(line)
                text = format_sft_prompt(row["instruction"], row.get("input")) + row["output"]
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        return path

    def preprocess(self) -> str:
        from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
        from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl

        tokenizer = self.paths["tokenizer"]
        counts = {}
        for name, source in (("docstrings", self.path("corpus", "pretrain.jsonl")), ("sft_text", self._sft_as_text())):
            result = preprocess_jsonl(PreprocessConfig(inputs=[source], output_prefix=self.path("indexed", name),
                                                       tokenizer_model=tokenizer, workers=2, progress=False))
            counts[name] = result.documents
        result = preprocess_jsonl(PreprocessConfig(inputs=[self.path("corpus", "sft.jsonl")], format="sft",
                                                   output_prefix=self.path("indexed", "sft"),
                                                   tokenizer_model=tokenizer, workers=1, progress=False))
        counts["sft"] = result.documents
        result = tokenize_contrastive(PreprocessConfig(inputs=[self.path("corpus", "pairs.jsonl")],
                                                       output_prefix=self.path("indexed", "pairs"),
                                                       tokenizer_model=tokenizer, workers=1, progress=False))
        counts["pairs"] = result.documents
        self.results["preprocess"] = counts
        return ", ".join(f"{name} {count}" for name, count in counts.items()) + " documents"

    # -- training --
    def _run_config(self, stage: str, **sections) -> dict:
        plan = self.plan
        values = {
            "run_dir": self.path(stage),
            "model": {"recipe": "tiny", "overrides": {**plan.model, "vocab_size": self.vocab_size}},
            "train": {"seq_length": plan.seq_length, "log_interval": 10, "eval_interval": 0, "progress_bar": True,
                      "seed": 1234 + self.seed},
            "checkpoint": {"save_interval": 0, "keep_last": 1},
            "data": {"tokenizer": self.paths["tokenizer"]},
        }
        for name, section in sections.items():
            values[name] = {**values.get(name, {}), **section}
        from megatron_conan.config.loader import apply_overrides

        apply_overrides(values, [f"{key}={json.dumps(value)}" for key, value in self.overrides.get(stage, {}).items()])
        return values

    def _train(self, stage: str, world_size: int, values: dict) -> dict:
        from megatron_conan.distributed.spawn import run_distributed

        planned = world_size
        world_size, values = layout_for_host(world_size, values, gpu_count() if self.gpus is None else self.gpus)
        adapted = world_size != planned
        result = run_distributed(_train_stage, world_size, args=(stage, values), timeout_s=3600,
                                 log_level=logging.WARNING)[0]
        losses = result["losses"]
        self.results["stages"][stage] = {"run_dir": values["run_dir"], "first_loss": losses[min(losses)],
                                         "last_loss": losses[max(losses)], "steps": result["steps"],
                                         "device": result["device"], "ranks": world_size,
                                         "layout": "TP=1, DP=1: fewer GPUs than the plan's ranks" if adapted else "as planned"}
        return result

    def _loss_line(self, stage: str) -> str:
        entry = self.results["stages"][stage]
        return (f"loss {entry['first_loss']:.3f} -> {entry['last_loss']:.3f} over {entry['steps']} steps "
                f"on {entry['ranks']} x {entry['device']}"
                + ("" if entry["layout"] == "as planned" else f" ({entry['layout']})"))

    def random_init(self) -> None:
        """The pretraining run's initial weights, saved untrained (0 steps, the same seed and layout):
        the table's random-init row, what every stage must beat."""
        values = self._run_config("random_init", parallel={"tensor_parallel": 2},
                                  train={"train_steps": 0, "global_batch_size": self.plan.lm_batch,
                                         "micro_batch_size": self.plan.lm_batch // 2},
                                  data={"kind": "blended", "blend": self._blend()})
        from megatron_conan.distributed.spawn import run_distributed

        world_size, values = layout_for_host(2, values, gpu_count() if self.gpus is None else self.gpus)
        run_distributed(_train_stage, world_size, args=("pretrain", values), timeout_s=600, log_level=logging.WARNING)

    def _blend(self) -> dict:
        return {"sources": [{"name": "docstrings", "prefix": self.path("indexed", "docstrings"), "weight": 0.8},
                            {"name": "sft_text", "prefix": self.path("indexed", "sft_text"), "weight": 0.2}],
                "split": "100,0,0", "cache_dir": self.path("index_cache")}

    def pretrain(self) -> str:
        plan = self.plan
        self.random_init()
        blend = self._blend()
        self._train("pretrain", 2, self._run_config(
            "pretrain", parallel={"tensor_parallel": 2},
            optimizer={"lr": plan.pretrain_lr, "warmup_fraction": 0.05, "decay_style": "cosine",
                       "min_lr": plan.pretrain_lr / 10},
            train={"train_steps": plan.pretrain_steps, "global_batch_size": plan.lm_batch,
                   "micro_batch_size": plan.lm_batch // 2},
            data={"kind": "blended", "blend": blend}))
        return f"TP=2, blended docstrings 0.8 + SFT text 0.2, {self._loss_line('pretrain')}"

    def sft(self) -> str:
        plan = self.plan
        self._train("sft", 2, self._run_config(
            "sft", parallel={"tensor_parallel": 2},
            optimizer={"lr": plan.sft_lr, "warmup_fraction": 0.05, "min_lr": plan.sft_lr / 10},
            train={"train_steps": plan.sft_steps, "global_batch_size": plan.lm_batch,
                   "micro_batch_size": plan.lm_batch // 2},
            checkpoint={"load_dir": self.path("pretrain", "checkpoints")},
            data={"kind": "sft", "sft_prefix": self.path("indexed", "sft"), "split": "100,0,0"}))
        return f"TP=2, loss on the answers only, {self._loss_line('sft')}"

    def _embedding(self, **extra) -> dict:
        plan = self.plan
        return {"max_query_length": plan.max_query_length, "max_passage_length": plan.max_passage_length,
                "query_instruction": self.manifest["instructions"]["retrieval"],
                "packing": plan.max_tokens_per_row > 0, "max_tokens_per_row": max(plan.max_tokens_per_row, 1),
                **extra}

    def embed_weak(self) -> str:
        plan = self.plan
        self._train("embed-weak", 2, self._run_config(
            "embed-weak", model={"soft_mask": {"schedule": "linear", "position_scale": "len_over_pos"}},
            optimizer={"lr": plan.weak_lr, "warmup_fraction": 0.05, "min_lr": plan.weak_lr / 10,
                       "clip_grad": plan.clip_grad},
            train={"train_steps": plan.weak_steps, "global_batch_size": plan.weak_batch},
            checkpoint={"load_dir": self.path("sft", "checkpoints")},
            data={"kind": "contrastive", "contrastive_prefix": self.path("indexed", "pairs")},
            embedding=self._embedding(temperature=plan.temperature)))
        return f"DP=2, soft mask a(t) 0 -> 1, in-batch negatives of both ranks, {self._loss_line('embed-weak')}"

    def mine(self) -> str:
        from megatron_conan.datagen.mining import MiningConfig, mine_file
        from megatron_conan.eval.embedders import load_embedder
        from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
        from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig

        plan = self.plan
        mined = self.path("corpus", "retrieval_mined.jsonl")
        config = MiningConfig(num_negatives=plan.num_negatives, pool_size=plan.num_negatives + plan.num_candidates,
                              skip_top=2, batch_size=64)
        with load_embedder(self.path("embed-weak", "checkpoints"), max_length=plan.max_passage_length) as embedder:
            report = mine_file(self.path("corpus", "retrieval.jsonl"), mined, embedder, config,
                               corpus_path=self.path("corpus", "corpus.jsonl"), show_progress=True)
        inputs = [mined, self.path("corpus", "sts.jsonl"), self.path("corpus", "classification.jsonl")]
        tokenize_contrastive(PreprocessConfig(inputs=[path for path in inputs if os.path.getsize(path)],
                                              output_prefix=self.path("indexed", "supervised"),
                                              tokenizer_model=self.paths["tokenizer"], workers=1, progress=False))
        self.results["mining"] = report
        slots = report["negative_slots"]
        return (f"{report['examples']} retrieval queries against {report['corpus_texts']} texts with the stage-3 "
                f"model: pools of {report['mean_pool_size']:.1f} (first {plan.num_negatives} as negatives), "
                f"ranks 1-2 skipped, {report['too_few_negatives']['count']} with too few; "
                f"{slots['distinct_texts']} distinct texts in {slots['slots']} negative slots "
                f"({slots['distinct_per_slot']:.2f} per slot), the most used in {slots['most_used_text_slots']}")

    def embed_sup(self) -> str:
        plan = self.plan
        self._train("embed-sup", 2, self._run_config(
            # gentle: measured, lr 1e-3 for 120 steps on these 1.5k supervised pairs (other module
            # families than the held-out ones) lowers held-out nDCG below stage 3's
            "embed-sup", optimizer={"lr": plan.sup_lr, "warmup_fraction": 0.05, "min_lr": plan.sup_lr / 10,
                                    "clip_grad": plan.clip_grad},
            train={"train_steps": plan.sup_steps, "global_batch_size": 2 * plan.sup_batches["retrieval"]},
            checkpoint={"load_dir": self.path("embed-weak", "checkpoints")},
            data={"kind": "contrastive", "contrastive_prefix": self.path("indexed", "supervised")},
            embedding=self._embedding(temperature=plan.temperature, num_negatives=plan.num_negatives,
                                      task_batch_sizes=plan.sup_batches, matryoshka_dims=plan.matryoshka_dims,
                                      # the held-out task is retrieval: most steps are retrieval steps
                                      task_weights=plan.sup_task_weights)))
        return f"DP=2, DHNM hard negatives, Matryoshka {plan.matryoshka_dims}, {self._loss_line('embed-sup')}"

    def export(self) -> str:
        from megatron_conan.conversion.export import export_sentence_transformer

        os.makedirs(self.path("export"), exist_ok=True)
        self.paths["export"] = export_sentence_transformer(self.path("embed-sup", "checkpoints"),
                                                           self.path("export", "conan-pydoc"), overwrite=True,
                                                           max_seq_length=self.plan.max_passage_length)
        return f"sentence-transformers directory {self.paths['export']}"

    # -- evaluation and report --
    def evaluate(self) -> str:
        from megatron_conan.eval.stages import ModelUnderTest, evaluate_models, score

        # every model embeds queries with the query prompt (the instruction conditions the query;
        # pooling leaves it out) and texts cut where training cut passages: one format for all
        length = self.plan.max_passage_length
        instruction = self.manifest["instructions"]["retrieval"]

        def checkpoint(name: str, stage: str) -> ModelUnderTest:
            return ModelUnderTest(name, self.path(stage, "checkpoints"), "query", max_length=length,
                                  query_instruction=instruction)

        models = [checkpoint("0 random init (mean-pooled)", "random_init"),
                  checkpoint("1 pretrain (mean-pooled)", "pretrain"),
                  checkpoint("2 SFT (mean-pooled)", "sft"),
                  checkpoint("3 embed-weak", "embed-weak"),
                  checkpoint("4 embed-sup", "embed-sup"),
                  ModelUnderTest("4 embed-sup, exported", self.paths["export"], "query")]
        self.results["evaluation"] = evaluate_models(self.path("corpus", "heldout"), models,
                                                     matryoshka_of="4 embed-sup", dims=self.plan.matryoshka_dims)
        rows = {row["name"]: row for row in self.results["evaluation"]["rows"]}
        final, bm25 = rows["4 embed-sup"], rows["BM25"]
        return (f"{len(models)} models, BM25 and random: final nDCG@10 validation {score(final):.3f}, "
                f"test {score(final, 'test'):.3f} (BM25 {score(bm25):.3f} / {score(bm25, 'test'):.3f})")

    def report(self) -> str:
        from megatron_conan.eval.report import write_report

        from megatron_conan import atomic_write

        written = write_report(self.work_dir, self.results)
        atomic_write.text(self.path("results.json"), json.dumps(self.results, indent=2, default=str))
        return f"{len(written)} plots and report.md in {self.work_dir}"


def add_study_arguments(parser: argparse.ArgumentParser, output_name: str) -> None:
    """Options of a study that re-trains parts of a finished main job (benchmarks/learning_vs_st.py,
    benchmarks/ablations.py)."""
    parser.add_argument("--work-dir", default="runs/quickstart", help="a finished main job (make quickstart)")
    parser.add_argument("--output-dir", default=None, help=f"default: <work-dir>/{output_name}")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full", help="the plan the work dir was made with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


def set_up_console(our_level: int) -> None:
    """Everything is built here: nothing may be downloaded (the spawned ranks inherit the offline
    switches), and transformers' bars for loading and saving a 38-tensor model are noise between
    our lines. Our messages from `our_level` up, others' warnings, known warnings silenced."""
    set_offline_switches()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure_logging(our_level, "%(name)s: %(message)s")
    silence_known_warnings()


def stage_dir(work_dir: str, stage: str) -> str:
    """The run directory of `stage` (a stage id, ``embed-weak``) in a finished main job. Work
    directories made before the stage ids were spelled one way name it ``embed_weak``: that one is
    returned where it is the one present."""
    path = os.path.join(work_dir, stage)
    legacy = os.path.join(work_dir, stage.replace("-", "_"))
    return legacy if not os.path.isdir(path) and os.path.isdir(legacy) else path


def start_study(args, output_name: str, prog: str) -> bool:
    """Offline switches and logging for a study; False (after one line on stderr) when
    ``args.work_dir`` is not a finished main job."""
    set_up_console(logging.INFO)
    args.output_dir = args.output_dir or os.path.join(args.work_dir, output_name)
    if not os.path.isfile(os.path.join(args.work_dir, "sft", "checkpoints", "latest")):
        print(f"{prog}: {args.work_dir} is not a finished main job (no sft/checkpoints/latest): run make "
              "quickstart first", file=sys.stderr)  # user-facing: one line, then exit 2
        return False
    return True


def mean_std(values: List[float]) -> str:
    """``mean +- sample std`` (std 0 for one value), 4 decimals."""
    import statistics

    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {spread:.4f}"


STEPS = ("corpus", "tokenizer", "preprocess", "pretrain", "sft", "embed_weak", "mine", "embed_sup", "export",
         "evaluate", "report")


def plan_with(plan: Plan, settings: List[str]) -> Plan:
    """`plan` with ``field=value`` settings (value as JSON, else a string): a Plan field, or
    ``model.x`` / ``corpus.x`` merged into those dicts. ValueError names a malformed or unknown one."""
    changes: Dict[str, Any] = {}
    fields = {field.name for field in dataclasses.fields(Plan)}
    for setting in settings:
        key, equals, text = setting.partition("=")
        if not equals:
            raise ValueError(f"--set {setting!r}: expected field=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        section, dot, name = key.partition(".")
        if section not in fields or (dot and section not in ("model", "corpus")):
            raise ValueError(f"--set {setting!r}: {key} is not a plan field (fields: {', '.join(sorted(fields))}; "
                             "model.<ConanModelConfig field>, corpus.<PydocCorpusConfig field>)")
        if dot:
            changes[section] = {**changes.get(section, getattr(plan, section)), name: value}
        else:
            changes[key] = value
    return dataclasses.replace(plan, **changes)


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
    pipeline = Pipeline(args.work_dir, plan, args.seed)
    started = time.perf_counter()
    for name in STEPS:
        pipeline.timed(name.replace("_", "-"), getattr(pipeline, name))
    pipeline.results["timings"]["total"] = time.perf_counter() - started
    from megatron_conan.eval.report import format_table

    pipeline.say("")
    pipeline.say(format_table(pipeline.results["evaluation"]["rows"]))
    pipeline.say(f"\ntotal {pipeline.results['timings']['total'] / 60:.1f} min; report: "
                 f"{os.path.join(pipeline.work_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
