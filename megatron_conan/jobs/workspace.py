"""Where a job runs: its work directory (claimed, and read back by the studies), its console, and
the state the pipeline's steps share over it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Dict, Optional

from megatron_conan.console import configure_logging, set_offline_switches
from megatron_conan.jobs.plan import Plan
from megatron_conan.warning_filters import silence_known_warnings

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


def stage_dir(work_dir: str, stage: str) -> str:
    """The run directory of `stage` (a stage id, ``embed-weak``) in a finished main job. Work
    directories made before the stage ids were spelled one way name it ``embed_weak``: that one is
    returned where it is the one present."""
    path = os.path.join(work_dir, stage)
    legacy = os.path.join(work_dir, stage.replace("-", "_"))
    return legacy if not os.path.isdir(path) and os.path.isdir(legacy) else path


def set_up_console(our_level: int) -> None:
    """Everything is built here: nothing may be downloaded (the spawned ranks inherit the offline
    switches), and transformers' bars for loading and saving a 38-tensor model are noise between
    our lines. Our messages from `our_level` up, others' warnings, known warnings silenced."""
    set_offline_switches()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure_logging(our_level, "%(name)s: %(message)s")
    silence_known_warnings()


class Workspace:
    """What the pipeline's steps share: the work directory, the plan, and what each step leaves for
    the later ones (the corpus's manifest, the tokenizer, the results that go into the report)."""

    gpus: Optional[int] = None
    """GPUs to fit each stage's layout to (None: those present; 1 puts every stage on one rank)."""
    manifest: Dict[str, Any]
    """The corpus's manifest.json (set by the corpus step, or read from a finished job by a study)."""
    vocab_size: int
    """The tokenizer's (set with it by `use_tokenizer`)."""

    def __init__(self, work_dir: str, plan: Plan, seed: int = 0,
                 overrides: Optional[Dict[str, Dict[str, Any]]] = None):
        self.work_dir, self.plan, self.seed = os.path.abspath(work_dir), plan, seed
        self.overrides = overrides or {}
        """Per stage, dotted ``key: value`` config overrides on top of the plan (the ablations use them)."""
        self.paths: Dict[str, str] = {}
        self.results: Dict[str, Any] = {"plan": dataclasses.asdict(plan), "stages": {}, "timings": {}}

    def path(self, *parts: str) -> str:
        return os.path.join(self.work_dir, *parts)

    def use_tokenizer(self, model: str) -> None:
        """Train and embed with the SentencePiece model at `model` (this job's, or a finished job's)."""
        from megatron_conan.data.tokenizer import ConanTokenizer

        self.paths["tokenizer"] = model
        self.vocab_size = ConanTokenizer(model).vocab_size
