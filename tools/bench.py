#!/usr/bin/env python
"""Measure parts of the framework on this machine.

Subcommands: ``data`` (preprocessing and loader throughput), ``train`` (training throughput and peak memory per
parallel layout, through the real trainer), ``startup`` (peak host memory per rank while the engine builds the model),
``speed`` (our training step against Hugging Face's for the same model, interleaved in one process), ``convert``
(peak host memory of converting a large random checkpoint to Hugging Face and back).

Add a subcommand by writing ``add_<name>(subparsers)`` that registers a parser with ``func=run_<name>``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    import statistics

    from megatron_lite.config import load_config
    from megatron_lite.parity import parse_layout, run_layout

    prefix = Path(a.data)
    if not prefix.with_suffix(".idx").is_file():
        print(f"error: no shard at {prefix}.bin/.idx (run python tools/quickstart.py first, or pass --data)",
              file=sys.stderr)
        return 2
    overrides = [f"data.prefixes={prefix}", f"training.train_steps={a.steps}", "training.eval_interval=0",
                 "checkpoint.interval=0", *a.overrides]
    cfg = load_config(a.config, overrides)
    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    print(f"config {a.config} {' '.join(a.overrides)}; {a.steps} steps of {tokens_per_step} tokens, "
          f"first {a.warmup} not timed")
    print(f"{'layout':>18} {'ranks':>5} {'tokens/s':>10} {'s/step':>8} {'peak mem (any rank)':>18} "
          f"{'pipeline idle: measured / planner':>34}")
    single_s = None
    for name in a.layouts.split(","):
        layout = parse_layout(name)
        run = run_layout(layout, a.config, overrides, timeout=a.timeout)
        tps = statistics.median(run.tokens_per_s[a.warmup:])
        mem = max(run.memory_gib)
        step_s = tokens_per_step / tps
        single_s = step_s if name == "single" else single_s
        print(f"{name:>18} {layout.world_size:>5} {tps:>10,.0f} {step_s:>8.3f} {mem:>14.2f} GiB "
              f"{_bubble(layout, load_config(a.config, [*overrides, *layout.overrides]), step_s, single_s):>34}")
    return 0


def _bubble(layout, cfg, step_s: float, single_s: float | None) -> str:
    """For a pipeline layout: the share of the step not spent on this rank's share of the work (1 - (single-process
    step / pp) / step, each rank on its own core; includes the stage-to-stage traffic), beside the planner's bubble."""
    from megatron_lite.config import microbatches_per_rank
    from megatron_lite.planning.steptime import bubble_fraction
    from megatron_lite.rules import virtual_stages

    pp = cfg.parallel.pp
    if pp == 1:
        return ""
    dp = layout.world_size // (pp * cfg.parallel.tp)
    m = microbatches_per_rank(cfg.global_batch_size, cfg.training.micro_batch_size, dp)
    planned = bubble_fraction(pp, m, virtual_stages(cfg))
    measured = f"{1 - single_s / pp / step_s:.0%}" if single_s and layout.world_size == pp else "-"
    return f"{measured} / {planned:.0%}"


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


STARTUP_SIZES = {  # Llama-style shapes (untied 32k vocabulary), named by their parameter count
    "125m": ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.ffn_hidden_size=2048"],
    "400m": ["model.hidden_size=1024", "model.num_layers=26", "model.num_heads=16", "model.ffn_hidden_size=2816"],
    "1b": ["model.hidden_size=2048", "model.num_layers=16", "model.num_heads=16", "model.ffn_hidden_size=5632"],
}
STARTUP_BASE = ["model.vocab_size=32000", "model.max_seq_len=256", "model.position=rotary", "model.norm=rmsnorm",
                "model.activation=swiglu", "model.bias=false", "model.tie_embeddings=false", "data.seq_len=256",
                "training.global_batch_size=4", "training.micro_batch_size=1", "training.device=cpu"]


def _startup_rank(rank: int, overrides: list[str], out_dir: str) -> None:
    """Build the engine on this rank; record the peak growth of its resident memory when the model was built (for
    DeepSpeed: before ``deepspeed.initialize`` adds its own buffers) and when the engine was ready, and what it holds."""
    from megatron_lite.config import load_config
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.topology import Topology
    from megatron_lite.training.metrics import host_peak_bytes, reset_host_peak

    cfg = load_config(None, overrides)
    topology = Topology.from_env(cfg.parallel, "cpu")
    family = get_family(cfg.model.family)
    factory, task = family.factory(cfg, topology), family.task(cfg, topology)
    peaks: dict[str, int] = {}
    before = reset_host_peak()
    if cfg.parallel.engine == "deepspeed":  # the peak once the model is materialized, before deepspeed.initialize
        from megatron_lite.engines.deepspeed import DeepSpeedEngine

        class MeasuredDeepSpeedEngine(DeepSpeedEngine):
            def materialize(self, *args) -> None:
                super().materialize(*args)
                peaks["model"] = host_peak_bytes()

        engine = MeasuredDeepSpeedEngine(cfg, factory, topology, task)
    else:
        engine = build_engine(cfg, factory, topology, task)
    peaks["engine"] = host_peak_bytes()
    held = 0
    for p in engine.model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        held += local.numel() * local.element_size()
    largest = max(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.model.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "model": peaks.get("model", peaks["engine"]) - before, "engine": peaks["engine"] - before, "held": held,
        "largest": 4 * largest,
    }))


def startup_memory(layout: str, overrides: list[str], timeout: float = 600.0) -> list[dict]:
    """Per rank, in bytes: peak resident-memory growth once the model is built (``model``) and once the engine is
    ready (``engine``), the parameter bytes the rank holds (``held``) and the largest tensor in fp32 (``largest``)."""
    from megatron_lite.parity import parse_layout, preload, run_ranks

    parsed = parse_layout(layout)
    preload([parsed])  # imports (DeepSpeed's included) happen before the measurement, as in a real start
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as out:
        run_ranks(_startup_rank, parsed.world_size, ([*overrides, *parsed.overrides], out), timeout)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(parsed.world_size)]


def run_startup(a: argparse.Namespace) -> int:
    """Peak host memory per rank while each layout builds its engine, for each model size."""
    import torch

    from megatron_lite.config import load_config
    from megatron_lite.families import get_family

    gib = 2**30
    print(f"{'size':>5} {'params':>7} {'fp32':>6} {'layout':>7} {'model built':>11} {'engine ready':>12} "
          f"{'params held':>11}   (GiB, largest over ranks)")
    for size in a.sizes.split(","):
        overrides = [*STARTUP_BASE, *STARTUP_SIZES[size]]
        cfg = load_config(None, overrides)
        with torch.device("meta"):
            n = sum(p.numel() for p in get_family(cfg.model.family).construct(cfg.model).parameters())
        for layout in a.layouts.split(","):
            ranks = startup_memory(layout, overrides, a.timeout)
            model, engine, held = (max(r[k] for r in ranks) / gib for k in ("model", "engine", "held"))
            print(f"{size:>5} {n / 1e6:>6.0f}M {4 * n / gib:>6.2f} {layout:>7} {model:>11.2f} {engine:>12.2f} "
                  f"{held:>11.2f}", flush=True)
    return 0


def add_startup(sub) -> None:
    p = sub.add_parser("startup", help="peak host memory per rank while the engine builds the model (CPU ranks)")
    p.add_argument("--sizes", default="125m,400m,1b", help=f"comma-separated, from {', '.join(STARTUP_SIZES)}")
    p.add_argument("--layouts", default="single,ddp2,zero3,fsdp2")
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(func=run_startup)


SPEED_STYLES = {  # ~15-40M parameters at the default width: the CPU sizes of the comparison with Hugging Face
    "llama": ["model.position=rotary", "model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
              "model.tie_embeddings=false", "model.num_kv_heads=2", "model.ffn_hidden_size=1024"],
    "gpt2": ["model.position=learned", "model.norm=layernorm", "model.activation=gelu_tanh", "model.bias=true",
             "model.tie_embeddings=true"],
}


def speed_config(style: str, a: argparse.Namespace):
    from megatron_lite.config import load_config

    return load_config(None, [
        *SPEED_STYLES[style], f"model.vocab_size={a.vocab}", f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}",
        f"model.num_heads={a.heads}", f"model.max_seq_len={a.seq_len}", f"data.seq_len={a.seq_len}",
        f"training.global_batch_size={a.batch}", f"training.micro_batch_size={a.batch}", "training.grad_clip=1.0",
        f"training.precision={a.precision}", f"training.device={a.device}", "optimizer.lr=1e-4",
        "optimizer.weight_decay=0.1", *a.overrides,
    ])  # fmt: skip


class _Clock:
    """Wall time of a step, synchronized with the device so that queued GPU work is counted."""

    def __init__(self, device) -> None:
        self.device = device

    def __call__(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def speed_compare(style: str, a: argparse.Namespace) -> dict:
    """Our training step and Hugging Face's for the same model, interleaved in this process; medians and peaks."""
    import statistics

    import torch
    import torch.nn.functional as F
    import transformers

    from megatron_lite.convert import hf
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.planning.flops import training_flops_per_token
    from megatron_lite.planning.layout import Layout
    from megatron_lite.planning.memory import estimate
    from megatron_lite.topology import Topology
    from megatron_lite.training.metrics import host_peak_bytes, reset_host_peak

    cfg = speed_config(style, a)
    topology = Topology(device=torch.device("cuda" if a.device == "cuda" else "cpu"))
    device = topology.device
    family = get_family(cfg.model.family)
    ours = build_engine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
    arch = hf.hf_arch(cfg.model)
    hf_cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM
    # (special ids inside the vocabulary: GPT-2's config defaults to 50256)
    hf_cfg = hf_cls.config_class(**hf.config_to_hf(cfg.model), attn_implementation="sdpa", bos_token_id=0,
                                 eos_token_id=0)
    theirs = hf_cls(hf_cfg).to(device)
    theirs.load_state_dict(hf.to_hf({k: v.detach() for k, v in ours.model.state_dict().items()}, cfg.model))
    theirs.train()
    hf_optim = torch.optim.AdamW(theirs.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1,
                                 cfg.optimizer.beta2), eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay,
                                 fused=device.type == "cuda" or None)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (a.batch, a.seq_len + 1), generator=gen)
               for _ in range(a.warmup + a.steps)]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16"
                else __import__("contextlib").nullcontext())

    def hf_loss(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        with autocast:
            logits = theirs(input_ids=ids[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    with torch.no_grad():  # the same model: both give the same loss for the same weights, before any step
        theirs.eval()
        first_hf = hf_loss(batches[0]).item()
        theirs.train()
    first_ours = ours.eval_loss([{"input_ids": batches[0][:, :-1], "labels": batches[0][:, 1:]}])

    def hf_step(ids: torch.Tensor) -> None:
        hf_optim.zero_grad(set_to_none=True)
        hf_loss(ids).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.training.grad_clip)
        hf_optim.step()

    def our_step(ids: torch.Tensor) -> None:
        ours.train_step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], lr=cfg.optimizer.lr)

    clock = _Clock(device)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    peaks = {"ours": 0, "hf": 0}
    for i, ids in enumerate(batches):
        for side, step in (("ours", our_step), ("hf", hf_step)) if i % 2 == 0 else (("hf", hf_step), ("ours", our_step)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                before = reset_host_peak()
            start = clock()
            step(ids)
            if i >= a.warmup:
                times[side].append(clock() - start)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else host_peak_bytes()
                peaks[side] = max(peaks[side], peak - before)  # what the step adds: activations, gradients
    tokens = a.batch * a.seq_len
    flops_per_token = training_flops_per_token(cfg.model, a.seq_len, causal=False)
    planned = estimate(cfg.model, Layout(seq_len=a.seq_len, micro_batch=a.batch, dtype=a.precision, engine="deepspeed",
                                         zero=0, flash_attention=device.type == "cuda", overhead_bytes=0))
    planned_step = planned["breakdown"]["activations"] + planned["breakdown"]["gradients"]
    out = {"style": style, "params": sum(p.numel() for p in ours.model.parameters()), "first_loss_ours": first_ours,
           "first_loss_hf": first_hf, "flops_per_token": flops_per_token, "planned_bytes": planned_step}
    for side in ("ours", "hf"):
        median = statistics.median(times[side])
        out[side] = {"step_s": median, "tokens_per_s": tokens / median, "tflops": tokens / median * flops_per_token / 1e12,
                     "peak_bytes": peaks[side]}
    return out


def run_speed(a: argparse.Namespace) -> int:
    """Our trainer's step against Hugging Face's model for the same shapes, interleaved; one table."""
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    peak = 989e12 if a.device == "cuda" else None  # dense bf16 datasheet figure of H100/H200
    mem = "step mem"
    what = "allocated" if a.device == "cuda" else "resident"
    print(f"{a.steps} timed steps after {a.warmup} warm-up, batch {a.batch} x seq {a.seq_len}, {a.precision}, "
          f"{a.device}; median step; step mem: largest growth of {what} memory during one step (activations, "
          "gradients), planned: the planner's activations + gradients; MFU against 989 TFLOP/s (GPU only)")
    print(f"{'model':>8} {'params':>7} {'side':>5} {'first loss':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{mem:>10} {'planned':>9} {'ours/HF':>8}")
    for style in a.styles.split(","):
        r = speed_compare(style, a)
        for side in ("ours", "hf"):
            x = r[side]
            mfu = f"{x['tflops'] * 1e12 / peak:.1%}" if peak else "-"
            ratio = f"{r['ours']['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}x" if side == "ours" else ""
            planned = f"{r['planned_bytes'] / 2**30:.2f} GiB" if side == "ours" else ""
            print(f"{style:>8} {r['params'] / 1e6:>6.1f}M {side:>5} {r['first_loss_' + side]:>10.5f} "
                  f"{x['tokens_per_s']:>10,.0f} {x['tflops']:>8.3f} {mfu:>6} {x['peak_bytes'] / 2**30:>6.2f} GiB "
                  f"{planned:>9} {ratio:>8}", flush=True)
    return 0


def add_speed(sub) -> None:
    p = sub.add_parser("speed", help="our training step against Hugging Face's for the same model (tokens/s, MFU)")
    p.add_argument("--styles", default="llama,gpt2", help="comma-separated: llama, gpt2")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="dotted config overrides for our side (the HF side follows the model)")
    p.set_defaults(func=run_speed)


# ----------------------------------------------------------------------------------------------------------------------
# convert: peak host memory of tools/convert_checkpoint.py on a large random checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def write_random_checkpoint(out: Path, preset: str, seed: int = 0) -> tuple[int, int]:
    """A weights-only logical checkpoint of ``preset`` with random fp32 values, written tensor by tensor (the bench
    never holds the model); returns (bytes, largest tensor's bytes)."""
    import torch

    from megatron_lite.config import Config
    from megatron_lite.convert.checkpoint_io import expected_model_tensors, write_meta
    from megatron_lite.convert.streaming import Entry, ShardedWriter
    from megatron_lite.models.presets import get_preset

    config = Config()
    config.model = get_preset(preset)
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    expected = expected_model_tensors(config.model)
    entries = [Entry(k, tuple(t.shape), torch.float32) for k, t in expected.items()]
    out.mkdir(parents=True)
    writer = ShardedWriter(out, entries, 2 * 2**30)
    gen = torch.Generator().manual_seed(seed)
    for e in entries:
        writer.write(e.name, torch.randn(e.shape, generator=gen) * 0.02)
    writer.close()
    write_meta(out, config, {"kind": "random", "path": preset})
    return sum(e.nbytes for e in entries), max(e.nbytes for e in entries)


def _peak_rss_of(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GiB of the command, wall seconds, its last output line)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    last = proc.stdout.strip().splitlines()[-1]
    value, unit = last.rsplit("peak RSS ", 1)[1].split()[:2]
    return float(value) / (1024 if unit.startswith("MiB") else 1), wall, last


def run_convert(a: argparse.Namespace) -> int:
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    tool = str(Path(__file__).resolve().parent / "convert_checkpoint.py")
    try:
        t0 = time.perf_counter()
        size, largest = write_random_checkpoint(root / "ours", a.preset)  # in this process; children measure their own
        print(f"{a.preset}: random fp32 checkpoint of {size / 2**30:.2f} GiB (largest tensor {largest / 2**30:.2f} "
              f"GiB) written in {time.perf_counter() - t0:.0f} s under {root}")
        code = ("import megatron_lite.convert.hf_dir as h, megatron_lite.convert.deepspeed_native; "
                "from megatron_lite.convert.streaming import peak_rss_bytes; "
                "print('peak RSS', peak_rss_bytes() / 2**30, 'GiB')")
        base, _, _ = _peak_rss_of([sys.executable, "-c", code])
        print(f"baseline (python + torch + the converter's imports): peak RSS {base:.2f} GiB")
        for name, cmd in (
            ("ours -> hf", [tool, "--input", str(root / "ours"), "--to", "hf", "--output", str(root / "hf")]),
            ("hf -> ours", [tool, "--from", "hf", str(root / "hf"), "--output", str(root / "back")]),
        ):
            peak, wall, _ = _peak_rss_of([sys.executable, *cmd, "--no-progress"])
            print(f"{name}: peak RSS {peak:.2f} GiB ({peak / (size / 2**30):.0%} of the checkpoint; "
                  f"{peak - base:.2f} GiB above the baseline, largest tensor {largest / 2**30:.2f} GiB), {wall:.0f} s")
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
    add_speed(sub)
    add_convert(sub)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
