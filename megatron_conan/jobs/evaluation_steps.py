"""The main job's last steps: the stage-4 model exported for sentence-transformers, every model
evaluated on the held-out split beside BM25 and random, and the plots, report and results."""

from __future__ import annotations

import json
import os

from megatron_conan.jobs.workspace import Workspace


class EvaluationSteps(Workspace):
    """Each step returns its one-line summary; `evaluate` records the table the job prints."""

    def export(self) -> str:
        from megatron_conan.conversion.export import export_sentence_transformer

        os.makedirs(self.path("export"), exist_ok=True)
        self.paths["export"] = export_sentence_transformer(self.path("embed-sup", "checkpoints"),
                                                           self.path("export", "conan-pydoc"), overwrite=True,
                                                           max_seq_length=self.plan.max_passage_length)
        return f"sentence-transformers directory {self.paths['export']}"

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
        from megatron_conan import atomic_write
        from megatron_conan.eval.report import write_report

        written = write_report(self.work_dir, self.results)
        atomic_write.text(self.path("results.json"), json.dumps(self.results, indent=2, default=str))
        return f"{len(written)} plots and report.md in {self.work_dir}"
