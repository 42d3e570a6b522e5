#!/usr/bin/env python
"""Measure parts of the framework on this machine.

Subcommands: ``data`` (the preprocessing command's whole-process time per tokenizer against a ``datasets.map`` process
and tiktoken alone, then reader and loader throughput; ``megatron_lite/bench/data.py``), ``train`` (training
throughput and peak memory per parallel layout, through the real trainer), ``startup`` (peak host memory per rank
while the engine builds the model), ``pipeline-start`` (a pipeline's first steps with static stage shapes against
torch's start-up exchange of shapes), ``speed`` (our training step against Hugging Face's for the same model,
interleaved in one process), ``convert`` (peak host memory of converting a large random checkpoint to Hugging Face and
back).

Each subcommand measures with a module of ``megatron_lite.bench`` and prints its table here. Add one by writing
``add_<name>(subparsers)`` that registers a parser with ``func=run_<name>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path


def run_data(a: argparse.Namespace) -> int:
    from megatron_lite.bench.data import run

    return run(a)


def add_data(sub) -> None:
    from megatron_lite.bench.data import add_arguments

    p = sub.add_parser("data", help="preprocessing, whole process, per tokenizer (vs a datasets.map baseline and the "
                                    "tokenizer-only ceiling); reader/loader throughput")
    add_arguments(p)
    p.set_defaults(func=run_data)


def run_train(a: argparse.Namespace) -> int:
    """Train ``--steps`` steps under each layout; report the median tokens/s after warm-up and the largest peak memory
    over the ranks."""
    from megatron_lite.bench.train import measure_layouts, tokens_per_step, train_overrides

    prefix = Path(a.data)
    if not prefix.with_suffix(".idx").is_file():
        print(f"error: no shard at {prefix}.bin/.idx (run python tools/quickstart.py first, or pass --data)",
              file=sys.stderr)
        return 2
    overrides = train_overrides(prefix, a.steps, a.overrides)
    print(f"config {a.config} {' '.join(a.overrides)}; {a.steps} steps of {tokens_per_step(a.config, overrides)} "
          f"tokens, first {a.warmup} not timed")
    print(f"{'layout':>18} {'ranks':>5} {'tokens/s':>10} {'s/step':>8} {'peak mem (any rank)':>18} "
          f"{'pipeline idle: measured / planner':>34}")
    for r in measure_layouts(a.config, overrides, a.layouts.split(","), a.warmup, a.timeout):
        idle = "" if r.idle_planned is None else (
            f"{'-' if r.idle_measured is None else f'{r.idle_measured:.0%}'} / {r.idle_planned:.0%}")
        print(f"{r.layout:>18} {r.ranks:>5} {r.tokens_per_s:>10,.0f} {r.step_s:>8.3f} {r.memory_gib:>14.2f} GiB "
              f"{idle:>34}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="training tokens/s and peak memory per layout (in-process ranks, gloo on CPU)")
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--data", default="runs/quickstart/data/stdlib_docstrings", help="shard prefix to train on")
    p.add_argument("--layouts", default="single,ddp2,zero1,zero2,zero3,fsdp2,tp2,tp2-sp,fsdp2-tp2,pp2-1f1b,"
                                         "pp2-interleaved")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.set_defaults(func=run_train)


def run_startup(a: argparse.Namespace) -> int:
    """Peak host memory per rank while each layout builds its engine, for each model size."""
    from megatron_lite.bench.startup import measure_startup

    print(f"{'size':>5} {'params':>7} {'fp32':>6} {'layout':>7} {'model built':>11} {'engine ready':>12} "
          f"{'params held':>11}   (GiB, largest over ranks)")
    for r in measure_startup(a.sizes.split(","), a.layouts.split(","), a.timeout):
        print(f"{r.size:>5} {r.params / 1e6:>6.0f}M {4 * r.params / 2**30:>6.2f} {r.layout:>7} {r.model_gib:>11.2f} "
              f"{r.engine_gib:>12.2f} {r.held_gib:>11.2f}", flush=True)
    return 0


def add_startup(sub) -> None:
    from megatron_lite.bench.startup import STARTUP_SIZES

    p = sub.add_parser("startup", help="peak host memory per rank while the engine builds the model (CPU ranks)")
    p.add_argument("--sizes", default="125m,400m,1b", help=f"comma-separated, from {', '.join(STARTUP_SIZES)}")
    p.add_argument("--layouts", default="single,ddp2,zero3,fsdp2")
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(func=run_startup)


def run_pipeline_start(a: argparse.Namespace) -> int:
    """Each pipeline layout's first steps with static stage shapes and with torch's start-up exchange, alternating."""
    from megatron_lite.bench.pipeline_start import pipeline_start

    print(f"config {a.config} {' '.join(a.overrides)}; rank 0's step times (s), first step first")
    for layout in a.layouts.split(","):
        for repeat in range(a.repeats):
            for static in (True, False):
                times = pipeline_start(a.config, layout, a.overrides, a.steps, static, a.timeout)
                shapes = "static" if static else "exchanged"
                print(f"{layout:>16} {shapes:>9} #{repeat + 1}: {' '.join(f'{t:.3f}' for t in times)}", flush=True)
    return 0


def add_pipeline_start(sub) -> None:
    p = sub.add_parser("pipeline-start", help="a pipeline's first steps with static stage shapes against torch's "
                                              "start-up exchange of shapes (CPU ranks)")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--layouts", default="pp2-1f1b,pp4-1f1b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.set_defaults(func=run_pipeline_start)


def run_speed(a: argparse.Namespace) -> int:
    """Our trainer's step against Hugging Face's model for the same shapes, interleaved; one table."""
    import torch

    from megatron_lite.bench.speed import SpeedOptions, mfu_peak, speed_compare, speed_config

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    opts = SpeedOptions(**{f.name: getattr(a, f.name) for f in dataclasses.fields(SpeedOptions)})
    styles = a.styles.split(",")
    peak, source = mfu_peak(speed_config(styles[0], opts))
    mfu = f"MFU against {peak / 1e12:g} TFLOP/s ({source})" if peak else f"MFU: - ({source})"
    mem = "step mem"
    what = "allocated" if a.device == "cuda" else "resident"
    print(f"{a.steps} timed steps after {a.warmup} warm-up, batch {a.batch} x seq {a.seq_len}, {a.precision}, "
          f"{a.device}; median step; step mem: largest growth of {what} memory during one step (activations, "
          f"gradients), planned: the planner's activations + gradients; {mfu}")
    print(f"{'model':>8} {'params':>7} {'side':>5} {'first loss':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{mem:>10} {'planned':>9} {'ours/HF':>8}")
    for style in styles:
        r = speed_compare(style, opts)
        for side in ("ours", "hf"):
            x = r[side]
            mfu = f"{x['mfu']:.1%}" if x["mfu"] is not None else "-"
            ratio = f"{r['ours']['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}x" if side == "ours" else ""
            planned = f"{r['planned_bytes'] / 2**30:.2f} GiB" if side == "ours" else ""
            print(f"{style:>8} {r['params'] / 1e6:>6.1f}M {side:>5} {r['first_loss_' + side]:>10.5f} "
                  f"{x['tokens_per_s']:>10,.0f} {x['tflops']:>8.3f} {mfu:>6} {x['peak_bytes'] / 2**30:>6.2f} GiB "
                  f"{planned:>9} {ratio:>8}", flush=True)
    return 0


def add_speed(sub) -> None:
    from megatron_lite.bench.speed import SPEED_STYLES, SpeedOptions

    d = SpeedOptions()
    p = sub.add_parser("speed", help="our training step against Hugging Face's for the same model (tokens/s, MFU)")
    p.add_argument("--styles", default="llama,gpt2", help=f"comma-separated: {', '.join(SPEED_STYLES)}")
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("overrides", nargs="*", help="dotted config overrides for our side (the HF side follows the model)")
    p.set_defaults(func=run_speed)


def run_convert(a: argparse.Namespace) -> int:
    """Peak host memory of the converter each way, beside the baseline of its imports and the checkpoint's size."""
    from megatron_lite.bench.conversion import (
        ConversionFailed,
        baseline_rss_gib,
        measure_conversions,
        write_random_checkpoint,
    )

    root = Path(a.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    converter = [sys.executable, str(Path(__file__).resolve().parent / "convert_checkpoint.py")]
    try:
        t0 = time.perf_counter()
        size, largest = write_random_checkpoint(root / "ours", a.preset)  # in this process; children measure their own
        print(f"{a.preset}: random fp32 checkpoint of {size / 2**30:.2f} GiB (largest tensor {largest / 2**30:.2f} "
              f"GiB) written in {time.perf_counter() - t0:.0f} s under {root}")
        base = baseline_rss_gib()
        print(f"baseline (python + torch + the converter's imports): peak RSS {base:.2f} GiB")
        for r in measure_conversions(root, converter):
            print(f"{r.direction}: peak RSS {r.peak_gib:.2f} GiB ({r.peak_gib / (size / 2**30):.0%} of the checkpoint; "
                  f"{r.peak_gib - base:.2f} GiB above the baseline, largest tensor {largest / 2**30:.2f} GiB), "
                  f"{r.wall_s:.0f} s")
    except ConversionFailed as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        if not a.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="peak host memory of converting a large random checkpoint to HF and back")
    p.add_argument("--preset", default="llama-1b", help="model preset (configs/models; default llama-1b, 4.6 GiB)")
    p.add_argument("--dir", help="work directory (default: a temporary one; needs ~3x the checkpoint's size)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    p.set_defaults(func=run_convert)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_data(sub)
    add_train(sub)
    add_startup(sub)
    add_pipeline_start(sub)
    add_speed(sub)
    add_convert(sub)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
