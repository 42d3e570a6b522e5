"""The GPU suite: every test here is marked ``gpu`` and needs a CUDA device; without one the whole suite is skipped
with one reason line. ``tools/gpu_check.sh`` runs it on one H100/H200 (its ``--help`` lists the checks).

The pytest process itself never initializes CUDA: each check runs in a forked child (``run_layout`` /
``run_ranks``), and a CUDA context made before a fork breaks the children. So the device is detected through NVML
(fork-safe), and DeepSpeed is pointed at CUDA (``tests/conftest.py`` picks its CPU accelerator for the CPU tests).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.engines.conftest import corpus, tiny_config  # noqa: E402,F401  (fixtures the checks train on)

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    os.environ["DS_ACCELERATOR"] = "cuda"

SKIP_REASON = "needs a CUDA device (tools/gpu_check.sh runs this suite on one H100/H200)"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _cuda_device():
    if not HAS_CUDA:
        pytest.skip(SKIP_REASON)
    # Something in this process (an import: DeepSpeed's, the harness's preload) made a CUDA context: the forked
    # children of the checks would fail with "Cannot re-initialize CUDA in forked subprocess". Say so first.
    assert not torch.cuda.is_initialized(), "CUDA was initialized in the pytest process; forked ranks cannot use it"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report the suite's skip at this file, where it is decided, so that ``pytest -ra`` folds the whole suite's
    skips into one line instead of one per test."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and SKIP_REASON in str(report.longrepr[2]):
        report.longrepr = (str(Path(__file__)), None, report.longrepr[2])
    return report


def needs_deepspeed(layout: str) -> None:
    """Skip a DeepSpeed layout where DeepSpeed is not installed (the GPU machine brings it as a wheel)."""
    if layout.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: tools/gpu_check.sh --help says how "
                                                "to bring it as a wheel")


# Every check trains on the GPU in bf16 (the tiny model: seconds per run).
GPU = ["training.device=cuda", "training.precision=bf16"]
