"""The evaluation command lines show our INFO messages and only third-party warnings, even from a
library that sets its own logger to DEBUG when it is imported (bm25s does)."""

import logging

from megatron_conan.console import configure_logging


def test_ours_from_info_theirs_from_warning(capsys):
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    root.handlers = []
    try:
        configure_logging()
        configure_logging()  # idempotent: one handler, one filter
        chatty = logging.getLogger("bm25s")
        chatty.setLevel(logging.DEBUG)  # as bm25s does at import, after our configuration
        chatty.debug("Building index from IDs objects")
        chatty.info("an info of theirs")
        chatty.warning("a warning of theirs")
        logging.getLogger("megatron_conan.eval.embedders").info("loaded a checkpoint")
        logging.getLogger("megatron_conan_other").info("not ours: another package's prefix")
    finally:
        chatty.setLevel(logging.NOTSET)
        root.handlers = saved[1]
        root.setLevel(saved[0])
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["WARNING bm25s: a warning of theirs", "INFO megatron_conan.eval.embedders: loaded a checkpoint"]
