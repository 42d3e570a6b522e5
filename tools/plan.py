#!/usr/bin/env python
"""Plan a pretraining run before spending GPU time: parameters and FLOPs, Chinchilla sizing and wall-clock time,
per-GPU memory of a layout, and a search over layouts that fit.

    python tools/plan.py model   --preset llama3-8b
    python tools/plan.py compute --flops 1e23 --gpus 256 --gpu h100 --mfu 0.4
    python tools/plan.py compute --gpus 1024 --days 30 --preset llama3-8b
    python tools/plan.py memory  --config configs/x.yaml --gpus 16 --tp 2 --zero 1 --gpu-memory 80GiB
    python tools/plan.py search  --preset llama3-8b --gpus 16 --gpu-memory 80GiB

Every subcommand takes ``--json``. Formulas, conventions and JSON keys: docs/plan.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from typing import Any, NoReturn

from megatron_lite.config import ConfigError, ModelConfig, load_config
from megatron_lite.planning.encdec import EncDecSpec, as_spec, encdec_lengths
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.hardware import device_memory, known_devices, peak_flops
from megatron_lite.planning.layout import RECOMPUTE_POLICIES, Layout
from megatron_lite.planning.memory import estimate
from megatron_lite.planning.presets import get_preset
from megatron_lite.planning.flops import flops_per_processed_token
from megatron_lite.planning.params import count_params
from megatron_lite.planning.report import flops_convention, model_report
from megatron_lite.planning.scaling import (
    APPROACH_FITS,
    APPROACH_SOURCES,
    APPROACHES,
    BESIROGLU,
    HOFFMANN,
    PAPERS,
    SECONDS_PER_DAY,
    optimum,
    plan_compute,
    training_time,
)
from megatron_lite.planning.search import (
    DEFAULT_BATCH_TOKENS,
    Constraints,
    default_global_batch,
    search,
    smallest_footprint,
)
from megatron_lite.planning.steptime import LAYER_OVERHEAD_S, Network, tokens_per_sample

GiB = 1024**3
MEMORY_HELP = ("per-GPU memory: 80GB is decimal (80 x 10^9 bytes), 80G or 80GiB binary (80 x 2^30 bytes); "
               "tables print GiB (default: the memory --gpu reports)")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": GiB, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": GiB, "tib": 1024**4}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"plan.py: error: {message}\n")


def parse_bytes(text: str) -> int:
    """'80GiB', '80G' (GiB), '80GB' (10^9), '1.5TiB' or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: '{text}' (e.g. 80GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_count(text: str) -> float:
    """'7e9', '7B', '1.4T', '350M'."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]?)\s*", text)
    if not m or m.group(2).lower() not in _COUNT:
        raise argparse.ArgumentTypeError(f"not a number: '{text}' (e.g. 7e9 or 7B)")
    try:
        return float(m.group(1)) * _COUNT[m.group(2).lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None


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


# ----------------------------------------------------------------------------------------------------------------------


def _config_keys(path: str, overrides: list[str]) -> set[str]:
    """Dotted keys that the config file (with its ``base:`` chain) or an ``--override`` sets. Everything else in a
    loaded config is a trainer default (fp32, seq 1024, a global batch of 8), which is not what a model-only config
    (``configs/models/*.yaml``) means to plan with."""
    from pathlib import Path

    from megatron_lite.config import _read_yaml  # the loader's own reader, so base chains resolve as in training

    def walk(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict) and key != "deepspeed_overrides":
                out += walk(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}")
        return out

    keys = set(walk(_read_yaml(Path(path)), ""))
    return keys | {text.split("=", 1)[0].strip() for text in overrides}


def _model_max_seq_len(path: str, overrides: list[str]) -> int:
    """model.max_seq_len as the file and the overrides set it (before the config is built)."""
    from pathlib import Path

    from megatron_lite.config import _read_yaml

    value = _read_yaml(Path(path)).get("model", {}).get("max_seq_len")
    for text in overrides:
        key, _, given = text.partition("=")
        if key.strip() == "model.max_seq_len":
            value = given.strip()
    return int(value)


def _load_model(args: argparse.Namespace) -> tuple[ModelConfig | EncDecSpec, dict[str, Any], str]:
    """(model spec, run settings the config sets, name) from ``--preset`` or ``--config``.

    Only settings the config file sets are returned; ``_layout`` fills the rest with the planner's defaults and
    records them in ``args.defaults_used``, so that every table says what it assumed.
    """
    args.defaults_used = getattr(args, "defaults_used", [])
    args.warnings = getattr(args, "warnings", [])
    if args.preset and args.config:
        raise PlanError("give --preset or --config, not both")
    if args.preset:
        if args.override:
            raise PlanError(f"--override edits a --config file and cannot change --preset {args.preset}; "
                            "put the shape in a config's model: section instead")
        return get_preset(args.preset), {}, args.preset
    if args.config:
        keys = _config_keys(args.config, args.override or [])
        extra = []
        if "data.seq_len" not in keys and "model.max_seq_len" in keys:
            # the trainer's default data.seq_len (1024) would exceed a shorter model context and fail the load
            extra = [f"data.seq_len={_model_max_seq_len(args.config, args.override or [])}"]
        cfg = load_config(args.config, (args.override or []) + extra)
        p, t = cfg.parallel, cfg.training
        found: dict[str, Any] = {
            "data.seq_len": ("seq_len", cfg.data.seq_len),
            "training.global_batch_size": ("global_batch", cfg.global_batch_size),
            "training.global_batch_tokens": ("global_batch", cfg.global_batch_size),
            "training.micro_batch_size": ("micro_batch", t.micro_batch_size),
            "training.precision": ("dtype", t.precision), "parallel.tp": ("tp", p.tp), "parallel.pp": ("pp", p.pp),
            "parallel.zero_stage": ("zero", p.zero_stage),
            "parallel.engine": ("engine", p.engine if p.engine in ("deepspeed", "fsdp") else None),
            "parallel.pp_schedule": ("schedule", p.pp_schedule),
            "parallel.pp_virtual_stages": ("virtual_stages", p.pp_virtual_stages),
            "model.activation_checkpointing": ("recompute", "full" if cfg.model.activation_checkpointing else None),
        }
        defaults = {name: value for key, (name, value) in found.items() if key in keys and value is not None}
        if p.offload_params or p.fsdp_cpu_offload:
            defaults["offload"] = "params"
        elif p.offload_optimizer:
            defaults["offload"] = "optimizer"
        if cfg.model.family == "encoder_decoder":
            defaults["data"] = cfg.data  # its objective sets the target length (span corruption, seq2seq pairs)
        return as_spec(cfg.model), defaults, args.config
    raise PlanError("give --preset NAME or --config FILE")


def _seq_len(args: argparse.Namespace, spec: ModelConfig | EncDecSpec, defaults: dict[str, Any]) -> int:
    """--seq-len, else the config's data.seq_len, else the model's own context (max_seq_len); warns past the table."""
    if getattr(args, "seq_len", None) is not None:
        seq = args.seq_len
    elif defaults.get("seq_len") is not None:
        seq = defaults["seq_len"]
    else:
        seq = spec.max_seq_len
        args.defaults_used.append(f"seq {seq} (the model's max_seq_len)")
    if seq > spec.max_seq_len:
        table = "position table" if spec.position == "learned" else "context (max_seq_len)"
        args.warnings.append(f"--seq-len {seq} exceeds the model's {table} of {spec.max_seq_len} tokens: training "
                             f"refuses data.seq_len > model.max_seq_len; raise model.max_seq_len to plan this length")
    return seq


def _lengths(args: argparse.Namespace, spec: ModelConfig | EncDecSpec,
             defaults: dict[str, Any]) -> tuple[int, int | None]:
    """(sequence length, target length): the target of an encoder-decoder is ``--target-len``, else what the
    config's data section makes of the sequence length (span corruption: T5's target length; seq2seq pairs:
    data.target_seq_len), else (a preset) the sequence length. A decoder has no target (None)."""
    seq = _seq_len(args, spec, defaults)
    if not isinstance(spec, EncDecSpec):
        if getattr(args, "target_len", None) is not None:
            raise PlanError("--target-len is for encoder-decoder models; a decoder's sequence is --seq-len")
        return seq, None
    data = defaults.get("data")
    if getattr(args, "target_len", None) is not None:
        return seq, args.target_len
    if data is None:
        args.defaults_used.append(f"target {seq} tokens (the input length; give --target-len)")
        return seq, seq
    return encdec_lengths(dataclasses.replace(data, seq_len=seq))


def _layout(args: argparse.Namespace, spec: ModelConfig | EncDecSpec, defaults: dict[str, Any]) -> Layout:
    def pick(name: str, fallback: Any, say: str | None = None) -> Any:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            return value
        if defaults.get(name) is not None:
            return defaults[name]
        if say:
            args.defaults_used.append(say)
        return fallback

    if args.fsdp and args.zero is not None:
        raise PlanError(f"give --zero {args.zero} (DeepSpeed) or --fsdp, not both")
    engine = "fsdp" if args.fsdp else ("deepspeed" if args.zero is not None else pick("engine", "deepspeed"))
    seq, target = _lengths(args, spec, defaults)
    layout = Layout(
        gpus=args.gpus, gpus_per_node=args.gpus_per_node, tp=pick("tp", 1), pp=pick("pp", 1), engine=engine,
        zero=0 if engine == "fsdp" else pick("zero", 0), offload=pick("offload", None),
        micro_batch=pick("micro_batch", 1, "micro-batch 1"), seq_len=seq, target_len=target,
        global_batch=pick("global_batch", None),
        recompute=pick("recompute", "none"), schedule=pick("schedule", "1f1b"),
        virtual_stages=pick("virtual_stages", 2), dtype=pick("dtype", "bf16", "dtype bf16"),
        sequence_parallel=args.sequence_parallel, flash_attention=not args.no_flash,
        overhead_bytes=int(args.overhead_gib * GiB),
    )
    if layout.global_batch is None and args.command == "memory" and layout.gpus % (layout.tp * layout.pp) == 0:
        # The least a pipeline runs: one microbatch per stage (1F1B refuses fewer); without one, one per rank.
        per_rank = layout.pp if layout.pp > 1 else 1
        layout.global_batch = layout.dp * layout.micro_batch * per_rank
        args.defaults_used.append(f"global batch {layout.global_batch} ({per_rank} microbatch"
                                  f"{'es' if per_rank > 1 else ''} per rank; no --global-batch)")
    return layout


def _gpu_memory(args: argparse.Namespace) -> int:
    """``--gpu-memory``, else the memory of ``--gpu``; an unknown GPU is refused rather than silently not checked."""
    if args.gpu_memory is not None:
        if args.gpu_memory <= 0:
            raise PlanError(f"--gpu-memory must be positive, got {args.gpu_memory}")
        return args.gpu_memory
    memory = device_memory(args.gpu)
    if memory is None:
        raise PlanError(f"unknown --gpu '{args.gpu}'; known: {', '.join(known_devices())} (or give --gpu-memory)")
    return memory


def _peak(args: argparse.Namespace, dtype: str = "bf16") -> float:
    if args.peak_flops is not None:
        return args.peak_flops
    peak = peak_flops(args.gpu, dtype)
    if peak is None:
        raise PlanError(f"no {dtype} peak FLOP/s known for --gpu '{args.gpu}' (known: {', '.join(known_devices())}); "
                        "pass --peak-flops")
    return peak


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:,.2f} GiB"


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


def _duration(seconds: float) -> str:
    """Three significant digits in s, ms or us (whole seconds from 1000 s), so a 0.2 ms step does not print 0.000."""
    if seconds >= 1000:
        return f"{seconds:,.0f} s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{format(seconds / scale, '#.3g').rstrip('.')} {unit}"  # '#': 7.80, not 7.8
    raise AssertionError("unreachable")


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------------------------------------------------


def _seq_words(seq: int, target: int | None) -> str:
    """'seq 1024', or for an encoder-decoder 'input 512 + target 114'."""
    return f"seq {seq}" if target is None else f"input {seq} + target {target}"


def _defaults_row(args: argparse.Namespace) -> list[tuple[str, str]]:
    used = getattr(args, "defaults_used", [])
    return [("defaults", ", ".join(used) if used else "none (every setting given)")]


def cmd_model(args: argparse.Namespace) -> tuple[dict, str, str | None]:
    spec, defaults, name = _load_model(args)
    seq, target = _lengths(args, spec, defaults)
    r = model_report(spec, seq, name, target_len=target)
    r["defaults"] = list(args.defaults_used)
    rows = [("model", f"{name} ({r['family']})"),
            ("params total", f"{r['params_total']:,} ({_human(r['params_total'])})"),
            ("  embedding", f"{r['params_embedding']:,}"), ("  non-embedding", f"{r['params_non_embedding']:,}")]
    rows += [(f"  per {k} layer", f"{v:,}") for k, v in r["params_per_layer"].items()]
    rows += [("vocab", f"{r['vocab_size']:,} padded to {r['padded_vocab_size']:,} "
                       f"(+{r['vocab_padding_params']:,} params; unpadded total {r['params_total_unpadded']:,})"),
             ("meta-device count", f"{r['params_meta']:,} ({'agrees' if r['counts_agree'] else 'DISAGREES'})"
              if r["params_meta"] is not None else "unavailable"),
             ("N for FLOPs", f"{r['params_flops']:,}"),
             (f"FLOPs/token @ {_seq_words(seq, target)}",
              f"{r['flops_per_token']:.4g} (causal {r['flops_per_token_causal']:.4g})"),
             ("convention", r["flops_convention"])] + _defaults_row(args)
    problem = None
    if r["counts_agree"] is False:
        problem = (f"the closed-form count (total {r['params_total']:,}, embedding {r['params_embedding']:,}) "
                   f"disagrees with the meta-device model (total {r['params_meta']:,}, embedding "
                   f"{r['params_meta_embedding']:,}); planning/params.py no longer matches the model code")
    return r, _table(rows), problem


def _compute_model(args: argparse.Namespace) -> tuple[Any, str, int, float, int | None] | None:
    """(spec, name, seq, model FLOPs per token, target length) when ``compute`` is given a model, else None."""
    if not (args.preset or args.config):
        if args.seq_len is not None:
            raise PlanError("--seq-len needs a model (--preset or --config): the attention FLOPs depend on its shape")
        return None
    if args.params is not None:
        raise PlanError("give --params or a model (--preset/--config), not both: the model fixes the parameters")
    spec, defaults, name = _load_model(args)
    seq, target = _lengths(args, spec, defaults)
    return spec, name, seq, flops_per_processed_token(spec, seq, target), target


def cmd_compute(args: argparse.Namespace) -> tuple[dict, str, str | None]:
    args.defaults_used, args.warnings = [], []
    if args.price_per_gpu_hour is not None and args.gpus is None:
        raise PlanError("--price-per-gpu-hour needs --gpus N (the cost is the GPU-hours of N GPUs times the price)")
    if args.days is not None and args.hours is not None:
        raise PlanError("give --days or --hours, not both")
    deadline_s = args.days * SECONDS_PER_DAY if args.days is not None else (
        args.hours * 3600.0 if args.hours is not None else None)
    if deadline_s is not None and args.gpus is None:
        raise PlanError("--days/--hours need --gpus N: the budget is what N GPUs compute by the deadline")
    if deadline_s is not None and args.flops is not None:
        raise PlanError("give --flops or a deadline (--days/--hours with --gpus), not both")
    model = _compute_model(args)
    params = count_params(model[0]).total if model else args.params
    budget = None
    if deadline_s is not None:
        budget = args.gpus * _peak(args) * args.mfu * deadline_s  # model FLOPs: MFU is quoted against them
    if budget is not None and not model and (args.params is not None or args.tokens is not None):
        raise PlanError("with a deadline give a model (--preset or --config) or neither --params nor --tokens: the "
                        "deadline fixes the compute")
    spend = budget if budget is not None else args.flops  # model FLOPs to spend, when given
    if model and spend is not None and args.tokens is None:
        r = plan_compute(params=params, tokens=spend / model[3], approach=args.approach)  # the tokens they buy
    elif model and args.tokens is None:
        r = plan_compute(params=params, approach=args.approach)  # the model's compute-optimal tokens
    elif model and args.flops is not None:
        raise PlanError("give --flops or --tokens with a model, not both")
    else:
        r = plan_compute(spend, params, args.tokens, args.approach)
    fit = APPROACH_FITS[args.approach]
    if model:
        r.update(model=model[1], seq_len=model[2], flops_per_token=model[3], flops_model=r["tokens"] * model[3],
                 flops_convention=flops_convention(model[0], model[2], model[4]))
    else:
        r.update(flops_model=None, flops_convention="6PD (no model shape: the attention term is not counted)")
    rows = [("compute C = 6PD", f"{r['flops']:.4g} FLOPs (Chinchilla's accounting, what the fits use)")]
    if model:
        rows.append(("model FLOPs", f"{r['flops_model']:.4g} = tokens x {model[3]:.4g} per token at "
                                    f"{_seq_words(model[2], model[4])} "
                                    f"({r['flops_model'] / r['flops'] - 1:+.1%} vs 6PD; {r['flops_convention']})"))
    rows += [("params P", f"{r['params']:.4g} ({_human(r['params'])})"),
             ("tokens D", f"{r['tokens']:.4g} ({_human(r['tokens'])})"),
             ("tokens/param", f"{r['tokens_per_param']:.1f}"),
             ("predicted loss", f"{r['loss']:.3f} (L(N, D) with the [{fit.paper}] constants below)"),
             ("headline", f"{r['approach']} optimum" if r["compute_optimal"] else "as given (not optimized)")]
    if budget is not None:
        r.update(deadline_s=deadline_s, budget_flops=budget)
        rows.insert(0, ("deadline", f"{deadline_s / SECONDS_PER_DAY:,.2f} days on {args.gpus} x {args.gpu} at "
                                    f"{args.mfu:.0%} MFU = {budget:.4g} model FLOPs"))
        if model:
            opt = optimum(args.approach, params=params)
            r["optimal_tokens"] = opt["tokens"]
            r["days_for_optimal_tokens"] = training_time(opt["tokens"] * model[3], args.gpus, _peak(args),
                                                         args.mfu)["days"]
            rows.append((f"{args.approach} tokens", f"{opt['tokens']:.4g} for this model, which would take "
                                                    f"{r['days_for_optimal_tokens']:,.2f} days"))
            best = optimum(args.approach, flops=budget)
            r["optimum_for_budget"] = best
            rows.append(("optimum for it", f"{best['params']:.4g} params on {best['tokens']:.4g} tokens "
                                           f"({args.approach}, the budget as 6PD)"))
        if not model:
            rows.append(("note", "the budget is spent as 6PD; a real shape also spends the attention term: give "
                                 "--preset or --config to count it"))
    if args.gpus is not None:
        spent = r["flops_model"] if model else r["flops"]
        r.update(training_time(spent, args.gpus, _peak(args), args.mfu, args.price_per_gpu_hour))
        label = "model FLOPs" if model else "6PD: no attention term; give --preset or --config to count it"
        rows += [("GPUs", f"{args.gpus} x {args.gpu} at {args.mfu:.0%} MFU of {r['peak_flops']:.3g} FLOP/s"),
                 ("wall-clock", f"{r['days']:,.2f} days ({label})"), ("GPU-hours", f"{r['gpu_hours']:,.0f}")]
        if "cost" in r:
            rows.append(("cost", f"{r['cost']:,.0f} at {args.price_per_gpu_hour:g}/GPU-hour"))
    if model:
        rows += _defaults_row(args)
        r["defaults"] = list(args.defaults_used)
    text = _table(rows) + "\n\napproach        params        tokens       flops      loss\n"
    for k, v in r["approaches"].items():
        text += f"{k:<14}{v['params']:>10.3g}{v['tokens']:>14.3g}{v['flops']:>12.3g}{v['loss']:>10.3f}\n"
    text += "\nconstants: P_opt = K * C^a, D_opt = C / (6 P_opt); L(N, D) = E + A/N^alpha + B/D^beta\n"
    text += "".join(f"  [{key}] {paper}\n" for key, paper in PAPERS.items())
    for k, (K, a) in APPROACHES.items():
        paper, where = APPROACH_SOURCES[k]
        text += f"{k:<14}K={K:<9.4g} a={a:<7.4g} [{paper}] {where}\n"
    for fit in (HOFFMANN, BESIROGLU):
        text += (f"{'L(N, D)':<14}E={fit.E:g} A={fit.A:g} B={fit.B:g} alpha={fit.alpha:g} beta={fit.beta:g} "
                 f"[{fit.paper}] {fit.where}\n")
    return r, text.rstrip(), None


def cmd_memory(args: argparse.Namespace) -> tuple[dict, str, str | None]:
    spec, defaults, name = _load_model(args)
    layout = _layout(args, spec, defaults)
    r = estimate(spec, layout, _gpu_memory(args))
    r["defaults"] = list(args.defaults_used)
    b = r["breakdown"]
    grads = _gib(b["gradients"])
    if b["fp32_gradients"]:
        grads += (f" (+ {_gib(r['phases']['fp32_gradients'])} fp32 gradients the optimizer step makes, once the "
                  f"activations are freed: {_gib(b['fp32_gradients'])} above the backward peak)")
    rows = [("layout", f"{layout.name()} {layout.dtype} {_seq_words(layout.seq_len, layout.target_len)} "
                       f"{layout.schedule} (m={layout.num_microbatches})"),
            ("weights", _gib(b["weights"])), ("gradients", grads), ("optimizer", _gib(b["optimizer"])),
            ("activations", _gib(b["activations"])),
            ("overhead", _gib(b["overhead"]) + (f" (of which {_gib(r['phases']['gathered'])} gathered weights and "
                                                 "their gradient)" if r["phases"]["gathered"] else "")),
            ("per GPU", f"{_gib(r['per_gpu_bytes'])} (pipeline stage {r['most_loaded_stage']}, the most loaded; "
                        f"peak {r['peak_phase']})")]
    if r["cpu_bytes"]:
        rows.append(("host (offloaded)", f"{_gib(r['cpu_bytes'])} per GPU, {_gib(r['cpu_bytes_per_node'])} per node "
                                         f"of {min(layout.gpus, layout.gpus_per_node)} GPUs"))
    rows.append(("fits", f"{'yes' if r['fits'] else 'NO'} in {_gib(r['gpu_memory'])}"))
    rows += _defaults_row(args)
    return r, _table(rows), None


def cmd_search(args: argparse.Namespace) -> tuple[list, str, str | None]:
    spec, defaults, name = _load_model(args)
    if args.offload:
        raise PlanError("search neither enumerates nor times offloading; drop --offload and check an offloaded "
                        "layout with: plan.py memory --offload ...")
    defaults.pop("offload", None)
    memory = _gpu_memory(args)
    base = _layout(args, spec, defaults)
    fixed = Constraints(tp=args.tp, pp=args.pp, engine="fsdp" if args.fsdp else None, zero=args.zero,
                        micro_batch=args.micro_batch, recompute=args.recompute)
    if args.global_batch is not None:
        source = "--global-batch"
    elif defaults.get("global_batch") is not None:
        source = "the config's training batch"
    else:
        base.global_batch = default_global_batch(spec, base, fixed.micro_batch)
        source = f"default: about {DEFAULT_BATCH_TOKENS:,} tokens, rounded to a multiple of the {args.gpus} GPUs"
    net = Network(args.intra_node_bandwidth, args.inter_node_bandwidth)
    rows = search(spec, base, memory, _peak(args, base.dtype), args.mfu, net, args.top, fixed,
                  args.layer_overhead_us * 1e-6)
    for row in rows:
        row["global_batch_source"] = source
        row["defaults"] = list(args.defaults_used)
    per_sample = tokens_per_sample(spec, base)
    head = (f"{name} on {args.gpus} GPUs with {_gib(memory)} each, {base.dtype}, "
            f"{_seq_words(base.seq_len, base.target_len)}: global batch "
            f"{base.global_batch:,} x {per_sample:,} = {base.global_batch * per_sample:,} tokens per step ({source})")
    if fixed.flags():
        head += f"\nconstraints: {fixed.flags()}"
    if args.defaults_used:
        head += f"\ndefaults: {', '.join(d for d in args.defaults_used if not d.startswith('micro-batch'))}"
    if not rows:
        need = smallest_footprint(spec, base, fixed)
        return rows, f"{head}\nno layout fits: the smallest needs {_gib(need)} per GPU", None
    lines = [head, "ranked by the estimated time of that step (docs/plan.md, search); only layouts training runs",
             f"{'tp':>3}{'pp':>4}{'dp':>5}  {'engine':<7}{'mb':>4}{'m':>6}  {'recompute':<13}{'GiB/GPU':>9}"
             f"{'step':>10}{'tok/s':>12}{'MFU':>7}"]
    for x in rows:
        lay = x["layout"]
        eng = "fsdp" if lay["engine"] == "fsdp" else f"zero{lay['zero']}"
        lines.append(f"{lay['tp']:>3}{lay['pp']:>4}{lay['dp']:>5}  {eng:<7}{lay['micro_batch']:>4}"
                     f"{lay['num_microbatches']:>6}  {lay['recompute']:<13}{x['per_gpu_bytes'] / GiB:>9.1f}"
                     f"{_duration(x['step_time_s']):>10}{x['tokens_per_s']:>12,.0f}{x['mfu']:>7.1%}")
    return rows, "\n".join(lines), None


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
        p.add_argument("--gpus", type=positive_int, default=1)
        p.add_argument("--gpus-per-node", type=positive_int, default=8)
        p.add_argument("--tp", type=positive_int)
        p.add_argument("--pp", type=positive_int)
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
        p.add_argument("--no-flash", action="store_true", help="attention that stores the s x s scores")
        p.add_argument("--overhead-gib", type=non_negative_float, default=1.0,
                       help="fixed per-GPU overhead (CUDA context etc.)")
        p.add_argument("--gpu", default="h100", help="device name for peak FLOP/s and memory (default h100)")
        p.add_argument("--gpu-memory", type=parse_bytes, help=MEMORY_HELP)

    p = sub.add_parser("model", help="parameter counts and FLOPs per token")
    model_args(p)
    p.set_defaults(func=cmd_model)

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
    p.add_argument("--flops", type=parse_count)
    p.add_argument("--params", type=parse_count)
    p.add_argument("--tokens", type=parse_count)
    p.add_argument("--approach", default="approach1", choices=("approach1", "approach2", "approach3", "replication"))
    p.add_argument("--gpus", type=positive_int)
    p.add_argument("--gpu", default="h100")
    p.add_argument("--mfu", type=fraction, default=0.4)
    p.add_argument("--peak-flops", type=positive_float, help="per-GPU peak FLOP/s (default: looked up from --gpu)")
    p.add_argument("--price-per-gpu-hour", type=non_negative_float, help="needs --gpus")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compute)

    p = sub.add_parser("memory", help="per-GPU memory of one layout")
    model_args(p)
    layout_args(p)
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("search", help="layouts that fit, ranked by the estimated time of a step of the same batch",
                       description="Enumerates layouts that fit and ranks them by the estimated time of one step of "
                                   "the same global batch. --tp, --pp, --zero/--fsdp, --micro-batch and --recompute, "
                                   "when given, fix that choice instead of enumerating it.")
    model_args(p)
    layout_args(p)
    p.add_argument("--mfu", type=fraction, help="fraction of peak the matmuls attain (default: the curve calibrated "
                                                "on published runs, by hidden size; docs/plan.md)")
    p.add_argument("--peak-flops", type=positive_float)
    p.add_argument("--intra-node-bandwidth", type=positive_float, default=300e9, help="bytes/s per GPU (NVLink)")
    p.add_argument("--inter-node-bandwidth", type=positive_float, default=25e9, help="bytes/s per GPU (network)")
    p.add_argument("--layer-overhead-us", type=non_negative_float, default=LAYER_OVERHEAD_S * 1e6,
                   help="fixed cost per layer and microbatch, forward + backward (kernel launches)")
    p.add_argument("--top", type=positive_int, default=10)
    p.set_defaults(func=cmd_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, text, problem = args.func(args)
    except (PlanError, ConfigError, ValueError) as e:
        print(f"plan.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    for warning in getattr(args, "warnings", []):
        print(f"plan.py: warning: {warning}", file=sys.stderr)
    print(json.dumps(result, indent=2, default=_json_default) if args.json else text)
    if problem:  # the answer is printed, but it cannot be trusted: fail the command
        print(f"plan.py: error: {problem}", file=sys.stderr)
        return 1
    return 0


def _json_default(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    sys.exit(main())
