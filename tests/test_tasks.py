"""The task table (megatron_conan/tasks.py) is the one place task names and what they imply are
spelled out: the codes of existing stores stay put, every record field the parser checks comes from
the table, and no module of the training system names a task by a literal."""

import ast
import os

import pytest

from megatron_conan import tasks
from megatron_conan.data.jsonl import BadLineError
from megatron_conan.preprocess.encoders import parse_contrastive_record

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_conan")
PRODUCERS = ("datagen", "jobs")
"""Code that writes records of named tasks (data generators, the demo job's plans and steps)."""


def test_codes_of_written_stores_stay_put():
    # a store's rows hold these codes and the loader seeds each task's permutation with them
    assert tasks.TASK_NAMES == ("pair", "retrieval", "clr", "classification", "sts")
    assert tasks.stage_tasks(3) == ("pair",) and tasks.stage_tasks(4) == ("retrieval", "clr", "classification", "sts")
    assert tasks.paper_task_weights() == {"retrieval": 3.0, "clr": 3.0, "classification": 2.8, "sts": 1.8}
    assert tasks.format_query("Find it", "x") == "Instruct: Find it\nQuery: x"


def _record(task, fields=None):
    """A valid record of `task` built from the table's fields alone."""
    record = {"task": task.name, task.anchor: "an anchor", task.positive: "a positive"}
    if task.negatives_field:
        record[task.negatives_field] = ["a negative", "another"]
    if task.candidates_field:
        record[task.candidates_field] = ["a candidate"]
    if task.score_field:
        record[task.score_field] = 2.5
    return {**record, **(fields or {})}


@pytest.mark.parametrize("task", tasks.TASKS, ids=lambda task: task.name)
def test_each_task_parses_as_its_entry_declares(task):
    texts, meta = parse_contrastive_record(_record(task, {"instruction": "Do"}))
    negatives = 2 if task.negatives_field else 0
    candidates = 1 if task.candidates_field else 0
    assert meta["task"] == task.name and meta["num_negatives"] == negatives and meta["num_candidates"] == candidates
    assert texts[0] == tasks.format_query("Do", "an anchor")
    assert texts[1] == (tasks.format_query("Do", "a positive") if task.symmetric else "a positive")
    assert len(texts) == 2 + negatives + candidates
    assert (meta["score"] == 2.5) if task.score_field else meta["score"] != meta["score"]  # NaN
    for field in (task.anchor, task.positive, task.score_field):
        if field:
            with pytest.raises(BadLineError, match=field):
                parse_contrastive_record({key: value for key, value in _record(task).items() if key != field})
    if task.negatives_required:
        with pytest.raises(BadLineError, match=task.negatives_field):
            parse_contrastive_record(_record(task, {task.negatives_field: []}))


def _string_constants(path):
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_but_the_table_names_a_task():
    """What a task implies is read from its entry; a literal task name elsewhere (outside the data
    generators, which write records of named tasks) would be a second place to edit."""
    offenders = []
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, PACKAGE)
            if not name.endswith(".py") or relative == "tasks.py" or relative.startswith(PRODUCERS):
                continue
            offenders += [f"{relative}:{line} {value!r}" for line, value in _string_constants(path)
                          if value in tasks.TASK_NAMES]
    assert not offenders, offenders
