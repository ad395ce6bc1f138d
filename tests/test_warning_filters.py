"""The known-harmless log record is dropped at its logger and nothing else is: a CUDA build of torch
on a GPU-less machine with a CUDA toolkit (a login node) logs "No CUDA runtime is found" when
megatron-core imports torch.utils.cpp_extension, which broke the one-line errors of `--dry-run`."""

import logging

from megatron_conan.warning_filters import silence_known_warnings


def test_the_cuda_runtime_record_is_dropped_and_other_records_kept(caplog):
    silence_known_warnings()
    silence_known_warnings()  # idempotent: one filter, not two
    logger = logging.getLogger("torch.utils.cpp_extension")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
    assert [record.getMessage() for record in caplog.records] == ["Error checking compiler version for c++"]
