#!/usr/bin/env python
"""Plan a pretraining run before spending GPU time: parameters and FLOPs, Chinchilla sizing and wall-clock time,
per-GPU memory of a layout, and a search over layouts that fit.

    python tools/plan.py model   --preset llama3-8b
    python tools/plan.py compute --flops 1e23 --gpus 256 --gpu h100 --mfu 0.4
    python tools/plan.py compute --gpus 1024 --days 30 --preset llama3-8b
    python tools/plan.py memory  --config configs/x.yaml --gpus 16 --tp 2 --zero 1 --gpu-memory 80GiB
    python tools/plan.py search  --preset llama3-8b --gpus 16 --gpu-memory 80GiB
    python tools/plan.py memory  --preset mixtral-8x7b --gpus 64 --fsdp --ep 8 --seq-len 4096 --recompute full

Every subcommand takes ``--json``. Formulas, conventions and JSON keys: docs/plan.md. The answers come from
``megatron_lite.planning.commands``; this file parses the arguments and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Callable, NoReturn

from megatron_lite.config import ConfigError
from megatron_lite.planning import commands
from megatron_lite.planning.commands import ComputeOptions, SearchOptions
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.inputs import LayoutOptions, ModelOptions
from megatron_lite.planning.layout import RECOMPUTE_POLICIES
from megatron_lite.planning.units import parse_bytes, parse_count

MEMORY_HELP = ("per-GPU memory: 80GB is decimal (80 x 10^9 bytes), 80G or 80GiB binary (80 x 2^30 bytes); "
               "tables print GiB (default: the memory --gpu reports)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"plan.py: error: {message}\n")


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ``PlanError``: its message becomes the usage error."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except PlanError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = parse.__name__
    return typed


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {expected}, got '{text}'") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """An MFU: in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction of peak), got {value:g}")
    return value


memory_size = _argument(parse_bytes)
count = _argument(parse_count)


# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plan.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", help="named architecture, e.g. gpt2-124m, llama3-8b, t5-base")
        p.add_argument("--config", help="a training YAML config (its model, data and parallel sections)")
        p.add_argument("--override", action="append", help="dotted config override, e.g. model.num_layers=48")
        p.add_argument("--seq-len", type=positive_int,
                       help="sequence length (default: the config's data.seq_len, else the model's max_seq_len)")
        p.add_argument("--target-len", type=positive_int,
                       help="encoder-decoder: target tokens per sample (default: what the config's data section "
                            "makes, e.g. 114 for span corruption of 512 inputs; else --seq-len)")
        p.add_argument("--json", action="store_true", help="print one JSON object (docs/plan.md lists the keys)")

    def layout_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpus", type=positive_int, default=LayoutOptions.gpus)
        p.add_argument("--gpus-per-node", type=positive_int, default=LayoutOptions.gpus_per_node)
        p.add_argument("--tp", type=positive_int)
        p.add_argument("--pp", type=positive_int)
        p.add_argument("--cp", type=positive_int, help="context parallelism: ranks that split each sequence")
        p.add_argument("--ep", type=positive_int,
                       help="expert parallelism (mixture-of-experts models): data-parallel ranks that split each "
                            "mixture layer's experts; divides dp and model.moe.num_experts")
        p.add_argument("--zero", type=int, choices=range(4))
        p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully sharded) instead of DeepSpeed ZeRO")
        p.add_argument("--offload", choices=("optimizer", "params"))
        p.add_argument("--micro-batch", type=positive_int)
        p.add_argument("--global-batch", type=positive_int, help="samples per optimizer step (default: the config's)")
        p.add_argument("--recompute", choices=RECOMPUTE_POLICIES,
                       help="none; selective (Megatron: recompute the attention scores); selective-op (torchtitan's "
                            "op policy: save every other matmul output and the attention output); full")
        p.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved", "zb"),
                       help="pipeline schedule (default: the config's parallel.pp_schedule, else 1f1b)")
        p.add_argument("--virtual-stages", type=positive_int, help="model chunks per rank (interleaved; default 2)")
        p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
        p.add_argument("--sequence-parallel", action="store_true")
        p.add_argument("--no-flash", dest="flash_attention", action="store_false",
                       help="attention that stores the s x s scores")
        p.add_argument("--overhead-gib", type=non_negative_float, default=LayoutOptions.overhead_gib,
                       help="fixed per-GPU overhead (CUDA context etc.)")
        p.add_argument("--gpu", default=LayoutOptions.gpu,
                       help=f"device name for peak FLOP/s and memory (default {LayoutOptions.gpu})")
        p.add_argument("--gpu-memory", type=memory_size, help=MEMORY_HELP)

    p = sub.add_parser("model", help="parameter counts and FLOPs per token")
    model_args(p)
    p.set_defaults(func=commands.run_model, options=ModelOptions)

    p = sub.add_parser("compute", help="Chinchilla sizing, predicted loss, wall-clock time and cost",
                       description="Chinchilla sizing (C = 6PD, the fits' accounting) and wall-clock time in model "
                                   "FLOPs (6N + 12*L*H*Q*T per token, the convention MFU is quoted in) when a model "
                                   "is given. --gpus N --days D: the compute-optimal model and tokens for what N GPUs "
                                   "compute by then, or, with a model, the tokens it trains by then.")
    p.add_argument("--preset", help="a model: its parameters and shape (attention FLOPs), e.g. llama3-8b")
    p.add_argument("--config", help="a training YAML config (its model section)")
    p.add_argument("--override", action="append", help="dotted config override")
    p.add_argument("--seq-len", type=positive_int, help="with a model: sequence length (default: its max_seq_len)")
    p.add_argument("--days", type=positive_float, help="deadline in days (needs --gpus)")
    p.add_argument("--hours", type=positive_float, help="deadline in hours (needs --gpus)")
    p.add_argument("--flops", type=count)
    p.add_argument("--params", type=count)
    p.add_argument("--tokens", type=count)
    p.add_argument("--approach", default=ComputeOptions.approach,
                   choices=("approach1", "approach2", "approach3", "replication"))
    p.add_argument("--gpus", type=positive_int)
    p.add_argument("--gpu", default=ComputeOptions.gpu)
    p.add_argument("--mfu", type=fraction, default=ComputeOptions.mfu)
    p.add_argument("--peak-flops", type=positive_float, help="per-GPU peak FLOP/s (default: looked up from --gpu)")
    p.add_argument("--price-per-gpu-hour", type=non_negative_float, help="needs --gpus")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.run_compute, options=ComputeOptions)

    p = sub.add_parser("memory", help="per-GPU memory of one layout")
    model_args(p)
    layout_args(p)
    p.set_defaults(func=commands.run_memory, options=LayoutOptions)

    p = sub.add_parser("search", help="layouts that fit, ranked by the estimated time of a step of the same batch",
                       description="Enumerates layouts that fit and ranks them by the estimated time of one step of "
                                   "the same global batch. --tp, --pp, --cp, --ep, --zero/--fsdp, --micro-batch and "
                                   "--recompute, when given, fix that choice instead of enumerating it.")
    model_args(p)
    layout_args(p)
    p.add_argument("--mfu", type=fraction, help="fraction of peak the matmuls attain (default: the curve calibrated "
                                                "on published runs, by hidden size; docs/plan.md)")
    p.add_argument("--peak-flops", type=positive_float)
    p.add_argument("--intra-node-bandwidth", type=positive_float, default=SearchOptions.intra_node_bandwidth,
                   help="bytes/s per GPU (NVLink)")
    p.add_argument("--inter-node-bandwidth", type=positive_float, default=SearchOptions.inter_node_bandwidth,
                   help="bytes/s per GPU (network)")
    p.add_argument("--layer-overhead-us", type=non_negative_float, default=SearchOptions.layer_overhead_us,
                   help="fixed cost per layer and microbatch, forward + backward (kernel launches)")
    p.add_argument("--top", type=positive_int, default=SearchOptions.top)
    p.set_defaults(func=commands.run_search, options=SearchOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = args.options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args.options)
                              if hasattr(args, f.name)})
    try:
        answer = args.func(options)
    except (PlanError, ConfigError, ValueError) as e:
        print(f"plan.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    for warning in answer.warnings:
        print(f"plan.py: warning: {warning}", file=sys.stderr)
    print(json.dumps(answer.result, indent=2, default=_json_default) if args.json else answer.text)
    if answer.problem:  # the answer is printed, but it cannot be trusted: fail the command
        print(f"plan.py: error: {answer.problem}", file=sys.stderr)
        return 1
    return 0


def _json_default(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    sys.exit(main())
