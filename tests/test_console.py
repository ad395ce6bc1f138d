"""Every tool is a console script through one wrapper (megatron_conan/console.py): the entry-point
table of setup.py names importable `main` functions (checked without re-installing: the table is
read from setup.py), an argument error of any command is one stderr line with exit status 2,
`tools/*.py` are thin scripts over the package, and nothing in tools/ or benchmarks/ edits
sys.path."""

import ast
import glob
import importlib
import logging
import os

import pytest

from megatron_conan.console import OFFLINE_SWITCHES, UsageError, command_parser, configure_logging, run_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _console_scripts():
    """{command: "module:function"} from setup.py's entry_points."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entries = ast.literal_eval(node.value)["console_scripts"]
            return dict(entry.split("=", 1) for entry in entries)
    raise AssertionError("setup.py has no entry_points")


SCRIPTS = _console_scripts()


def test_every_tool_has_a_console_script():
    assert {name for name in SCRIPTS} >= {
        "conan-pretrain", "conan-sft", "conan-embed-weak", "conan-embed-sup", "conan-encode", "conan-eval",
        "conan-train-tokenizer", "conan-preprocess", "conan-tokenize-contrastive", "conan-sft-to-pairs",
        "conan-build-clr", "conan-build-pydoc-corpus", "conan-mine", "conan-convert", "conan-gpu-check"}
    for name, target in SCRIPTS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_every_console_script_is_named_in_the_readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert not [name for name in SCRIPTS if f"`{name}" not in readme]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_an_argument_error_is_one_line_and_exit_2(name, monkeypatch, capsys):
    for switch in OFFLINE_SWITCHES:
        monkeypatch.setenv(switch, "1")
    module, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    assert main(["--no-such-flag"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"{name}: error: unrecognized arguments: --no-such-flag"] or (
        # a command with a required positional or sub-command names that first
        len(captured.err.splitlines()) == 1 and captured.err.startswith(f"{name}: error: ")), captured.err


def test_tools_are_thin_scripts_over_the_console_scripts():
    modules = {target.split(":")[0] for target in SCRIPTS.values()}
    for path in glob.glob(os.path.join(REPO, "tools", "*.py")):
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        ours = [module for module in imported if module.startswith("megatron_conan")]
        assert len(ours) == 1 and ours[0] in modules, (path, ours)
        assert not any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree)), path


def test_no_script_edits_sys_path():
    offenders = []
    for path in glob.glob(os.path.join(REPO, "tools", "*.py")) + glob.glob(os.path.join(REPO, "benchmarks", "*.py")):
        with open(path, encoding="utf-8") as handle:
            if "sys.path.insert" in handle.read():
                offenders.append(os.path.relpath(path, REPO))
    assert not offenders, offenders


def test_the_wrapper_sets_the_offline_switches_and_turns_usage_errors_into_one_line(monkeypatch, capsys):
    for switch in OFFLINE_SWITCHES:
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's own setting is kept

    def command(argv):
        parser = command_parser("conan-x", "a command")
        parser.add_argument("--count", type=int, required=True)
        return parser.parse_args(argv).count

    assert run_command(command, ["--count", "3"], prog="conan-x") == 3
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["TRANSFORMERS_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert run_command(command, ["--count", "x"], prog="conan-x") == 2
    assert capsys.readouterr().err == "conan-x: error: argument --count: invalid int value: 'x'\n"
    with pytest.raises(UsageError, match="the following arguments are required: --count"):
        command([])
    with pytest.raises(SystemExit):  # --help still prints and exits 0
        command(["--help"])
    assert "a command" in capsys.readouterr().out


def test_logging_levels_ours_and_theirs(capsys):
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    root.handlers = []
    try:
        configure_logging(logging.INFO, "[rank 0] %(name)s: %(message)s", logging.INFO)
        logging.getLogger("megatron_conan.training").info("ours")
        logging.getLogger("a_library").info("theirs at info")
        logging.getLogger("a_library").debug("theirs at debug")
        configure_logging(logging.WARNING)  # again: the filter is replaced, not added
        logging.getLogger("megatron_conan.training").info("ours, now hidden")
        logging.getLogger("a_library").warning("theirs, a warning")
    finally:
        root.handlers = saved[1]
        root.setLevel(saved[0])
    assert capsys.readouterr().err.splitlines() == [
        "[rank 0] megatron_conan.training: ours", "[rank 0] a_library: theirs at info", "[rank 0] a_library: theirs, a warning"]
