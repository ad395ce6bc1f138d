"""The main job's data steps: corpora from Python's own documentation, the tokenizer, the indexed
datasets and stores, and stage 4's hard negatives mined with the stage-3 model."""

from __future__ import annotations

import json
import os

from megatron_conan.jobs.workspace import Workspace


class DataSteps(Workspace):
    """Each step returns its one-line summary and records its figures in `results`."""

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
        from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

        prefix = self.path("tokenizer", "pydoc")
        train_tokenizer([self.path("corpus", "pretrain.jsonl")], prefix,
                        TokenizerTrainingConfig(vocab_size=self.plan.vocab_size, num_threads=2, seed=self.seed))
        self.use_tokenizer(prefix + ".model")
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
