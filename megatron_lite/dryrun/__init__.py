"""Dry run at the real world size on one CPU: every class of rank built as training builds it under a fake process
group, the layout's rules checked, per-rank memory counted from the real sharded tensors, a step traced with fake
tensors, and the planner's estimate beside it (``python launch/pretrain.py --config C --dry-run --world N``)."""

from megatron_lite.dryrun.run import DryRunReport, dry_run, write_json
from megatron_lite.dryrun.simulate import RankHoldings, rank_classes

__all__ = ["DryRunReport", "RankHoldings", "dry_run", "rank_classes", "write_json"]
