"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at the top of the first module pytest loads. On a machine with CUDA the
GPU suite (marker ``gpu``) runs on the real device instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the `slow` tests in Triton's interpreter on the CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(
        reason="`slow`: minutes in Triton's interpreter; runs on CUDA, or here with --run-slow")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core on a CPU, where the
    kernels run in Triton's interpreter; in-process on a CUDA machine, so GPU
    tests do not share one device between workers (long shapes would run out of
    memory and timings would interfere)."""
    if torch.cuda.is_available():
        return 0
    return os.cpu_count() or 1
