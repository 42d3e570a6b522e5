"""The layout-parity harness: every parallel layout must train like one process, tensor by tensor.

``compare_layouts`` runs a config under several layouts (``layouts.py`` names them) in forked ranks and returns a
``ParityReport``; ``tools/loss_compare.py`` is its command line.
"""

from megatron_lite.parity.frozen import GradientCheck
from megatron_lite.parity.gradients import GRAD_RTOL, TensorDiff, compare_pieces, coverage_gaps, load_pieces, \
    read_reference
from megatron_lite.parity.harness import DEFAULT_LAYOUTS, EXPERT_LAYOUTS, LayoutRun, compare_layouts, run_layout
from megatron_lite.parity.layouts import ZERO_DEFAULT_DP, Layout, parse_layout
from megatron_lite.parity.ranks import free_port, preload, run_ranks
from megatron_lite.parity.report import LOSS_TOLERANCE, ParityReport
from megatron_lite.parity.structure import check_structure

__all__ = [
    "DEFAULT_LAYOUTS", "EXPERT_LAYOUTS", "GRAD_RTOL", "LOSS_TOLERANCE", "ZERO_DEFAULT_DP", "GradientCheck", "Layout", "LayoutRun",
    "ParityReport", "TensorDiff", "check_structure", "compare_layouts", "compare_pieces", "coverage_gaps",
    "free_port", "load_pieces", "parse_layout", "preload", "read_reference", "run_layout", "run_ranks",
]
