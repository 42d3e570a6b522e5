"""What a planning command is asked, made concrete: the model (a preset, or a training config with overrides), the
lengths to plan it at, one layout, and the device's memory and peak FLOP/s.

A setting nobody gave falls back to the planner's default, and every default taken is written into ``Notes`` so that
each table says what it assumed. A config's own settings win over those defaults, but only the settings its file
(with its ``base:`` chain) or an ``--override`` sets: the rest of a loaded config is the trainer's defaults (fp32,
seq 1024, a global batch of 8), which a model-only config (``configs/models/*.yaml``) does not mean.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from megatron_lite.config import Config, ModelConfig, load_config, read_yaml
from megatron_lite.planning.encdec import EncDecSpec, as_spec, encdec_lengths
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.hardware import device_memory, known_devices, peak_flops
from megatron_lite.planning.layout import Layout
from megatron_lite.planning.presets import get_preset
from megatron_lite.planning.runnable import LAYOUT_KEYS, planned_offload
from megatron_lite.planning.units import GiB

ModelSpec = ModelConfig | EncDecSpec


@dataclass
class ModelOptions:
    """Which model: ``preset`` or ``config`` (with dotted ``override`` strings), and the lengths to plan it at
    (None: the config's, else the model's own context)."""

    preset: str | None = None
    config: str | None = None
    override: list[str] | None = None
    seq_len: int | None = None
    target_len: int | None = None


@dataclass
class LayoutOptions(ModelOptions):
    """One layout on ``gpus`` devices. None leaves a setting to the config, then to the planner's default."""

    gpus: int = 1
    gpus_per_node: int = 8
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    ep: int | None = None
    zero: int | None = None
    fsdp: bool = False
    offload: str | None = None
    micro_batch: int | None = None
    global_batch: int | None = None
    recompute: str | None = None
    schedule: str | None = None
    virtual_stages: int | None = None
    dtype: str | None = None
    sequence_parallel: bool = False
    flash_attention: bool = True
    overhead_gib: float = 1.0
    gpu: str = "h100"
    gpu_memory: int | None = None


@dataclass
class Notes:
    """What a plan assumed (``defaults``, printed in its table) and what the user should know (``warnings``)."""

    defaults: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class PlannedModel(NamedTuple):
    """The model to plan, the layout settings its config sets (by ``Layout`` field; an encoder-decoder's data
    section under ``data``), and the name tables call it by."""

    spec: ModelSpec
    settings: dict[str, Any]
    name: str


def config_keys(path: str, overrides: list[str]) -> set[str]:
    """Dotted keys that the config file (with its ``base:`` chain) or an override sets."""

    def walk(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict) and key != "deepspeed_overrides":
                out += walk(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}")
        return out

    keys = set(walk(read_yaml(path), ""))
    return keys | {text.split("=", 1)[0].strip() for text in overrides}


def _model_max_seq_len(path: str, overrides: list[str]) -> int:
    """model.max_seq_len as the file and the overrides set it (before the config is built)."""
    value = read_yaml(path).get("model", {}).get("max_seq_len")
    for text in overrides:
        key, _, given = text.partition("=")
        if key.strip() == "model.max_seq_len":
            value = given.strip()
    return int(value)


def config_settings(cfg: Config, keys: set[str]) -> dict[str, Any]:
    """The layout settings of ``cfg`` that ``keys`` (what its file and overrides set) name, by ``Layout`` field:
    ``runnable.LAYOUT_KEYS`` and ``runnable.offload_keys`` read backwards, so the settings a config plans with are
    the ones ``engine_config`` writes for the layout."""
    values: dict[str, Any] = {}
    for name, dotted in LAYOUT_KEYS.items():
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        values[name] = node
    values["global_batch"] = cfg.global_batch_size  # samples per step, also when the config gives tokens
    if values["engine"] not in ("deepspeed", "fsdp"):
        values["engine"] = None  # single and DDP: the planner's engines are DeepSpeed (ZeRO 0-3) and FSDP2
    given = keys | ({LAYOUT_KEYS["global_batch"]} if "training.global_batch_tokens" in keys else set())
    settings = {name: value for name, value in values.items() if LAYOUT_KEYS[name] in given and value is not None}
    if "model.activation_checkpointing" in keys and cfg.model.activation_checkpointing:
        settings["recompute"] = "full"
    offload = planned_offload(cfg.parallel)
    if offload is not None:
        settings["offload"] = offload
    return settings


def load_model(opts: ModelOptions) -> PlannedModel:
    """The model of ``--preset`` or ``--config``, with the settings the config sets (none for a preset)."""
    overrides = opts.override or []
    if opts.preset and opts.config:
        raise PlanError("give --preset or --config, not both")
    if opts.preset:
        if overrides:
            raise PlanError(f"--override edits a --config file and cannot change --preset {opts.preset}; "
                            "put the shape in a config's model: section instead")
        return PlannedModel(get_preset(opts.preset), {}, opts.preset)
    if opts.config:
        keys = config_keys(opts.config, overrides)
        extra = []
        if "data.seq_len" not in keys and "model.max_seq_len" in keys:
            # the trainer's default data.seq_len (1024) would exceed a shorter model context and fail the load
            extra = [f"data.seq_len={_model_max_seq_len(opts.config, overrides)}"]
        cfg = load_config(opts.config, overrides + extra)
        settings = config_settings(cfg, keys)
        if cfg.model.family == "encoder_decoder":
            settings["data"] = cfg.data  # its objective sets the target length (span corruption, seq2seq pairs)
        return PlannedModel(as_spec(cfg.model), settings, opts.config)
    raise PlanError("give --preset NAME or --config FILE")


def seq_len(opts: ModelOptions, spec: ModelSpec, settings: dict[str, Any], notes: Notes) -> int:
    """--seq-len, else the config's data.seq_len, else the model's own context (max_seq_len); warns past the table."""
    if opts.seq_len is not None:
        seq = opts.seq_len
    elif settings.get("seq_len") is not None:
        seq = settings["seq_len"]
    else:
        seq = spec.max_seq_len
        notes.defaults.append(f"seq {seq} (the model's max_seq_len)")
    if seq > spec.max_seq_len:
        what = "position table" if spec.position == "learned" else "context (max_seq_len)"
        notes.warnings.append(f"--seq-len {seq} exceeds the model's {what} of {spec.max_seq_len} tokens: training "
                              f"refuses data.seq_len > model.max_seq_len; raise model.max_seq_len to plan this length")
    return seq


def lengths(opts: ModelOptions, spec: ModelSpec, settings: dict[str, Any], notes: Notes) -> tuple[int, int | None]:
    """(sequence length, target length): the target of an encoder-decoder is ``--target-len``, else what the
    config's data section makes of the sequence length (span corruption: T5's target length; seq2seq pairs:
    data.target_seq_len), else (a preset) the sequence length. A decoder has no target (None)."""
    seq = seq_len(opts, spec, settings, notes)
    if not isinstance(spec, EncDecSpec):
        if opts.target_len is not None:
            raise PlanError("--target-len is for encoder-decoder models; a decoder's sequence is --seq-len")
        return seq, None
    data = settings.get("data")
    if opts.target_len is not None:
        return seq, opts.target_len
    if data is None:
        notes.defaults.append(f"target {seq} tokens (the input length; give --target-len)")
        return seq, seq
    return encdec_lengths(dataclasses.replace(data, seq_len=seq))


def layout(opts: LayoutOptions, spec: ModelSpec, settings: dict[str, Any], notes: Notes,
           least_global_batch: bool = False) -> Layout:
    """The layout the options ask for: each setting from the options, else the config, else the planner's default.

    ``least_global_batch``: without a global batch, plan the least a pipeline runs (one microbatch per stage, which
    1F1B needs; one per rank without a pipeline) instead of leaving it open.
    """

    def pick(given: Any, name: str, fallback: Any, say: str | None = None) -> Any:
        if given is not None and given is not False:
            return given
        if settings.get(name) is not None:
            return settings[name]
        if say:
            notes.defaults.append(say)
        return fallback

    if opts.fsdp and opts.zero is not None:
        raise PlanError(f"give --zero {opts.zero} (DeepSpeed) or --fsdp, not both")
    engine = "fsdp" if opts.fsdp else ("deepspeed" if opts.zero is not None else pick(None, "engine", "deepspeed"))
    seq, target = lengths(opts, spec, settings, notes)
    planned = Layout(
        gpus=opts.gpus, gpus_per_node=opts.gpus_per_node, tp=pick(opts.tp, "tp", 1), pp=pick(opts.pp, "pp", 1),
        cp=pick(opts.cp, "cp", 1), ep=pick(opts.ep, "ep", 1),
        engine=engine, zero=0 if engine == "fsdp" else pick(opts.zero, "zero", 0),
        offload=pick(opts.offload, "offload", None),
        micro_batch=pick(opts.micro_batch, "micro_batch", 1, "micro-batch 1"), seq_len=seq, target_len=target,
        global_batch=pick(opts.global_batch, "global_batch", None),
        recompute=pick(opts.recompute, "recompute", "none"), schedule=pick(opts.schedule, "schedule", "1f1b"),
        virtual_stages=pick(opts.virtual_stages, "virtual_stages", 2),
        dtype=pick(opts.dtype, "dtype", "bf16", "dtype bf16"),
        sequence_parallel=opts.sequence_parallel or bool(settings.get("sequence_parallel")),
        dp_replicate=settings.get("dp_replicate", 1) if engine == "fsdp" else 1, flash_attention=opts.flash_attention,
        overhead_bytes=int(opts.overhead_gib * GiB),
    )
    if planned.global_batch is None and least_global_batch and planned.gpus % (planned.tp * planned.pp) == 0:
        per_rank = planned.pp if planned.pp > 1 else 1
        planned.global_batch = planned.dp * planned.micro_batch * per_rank
        notes.defaults.append(f"global batch {planned.global_batch} ({per_rank} microbatch"
                              f"{'es' if per_rank > 1 else ''} per rank; no --global-batch)")
    return planned


def gpu_memory(gpu: str, given: int | None) -> int:
    """``given`` (``--gpu-memory``), else the memory of ``gpu``; an unknown GPU is refused rather than not checked."""
    if given is not None:
        if given <= 0:
            raise PlanError(f"--gpu-memory must be positive, got {given}")
        return given
    memory = device_memory(gpu)
    if memory is None:
        raise PlanError(f"unknown --gpu '{gpu}'; known: {', '.join(known_devices())} (or give --gpu-memory)")
    return memory


def peak(gpu: str, given: float | None, dtype: str = "bf16") -> float:
    """``given`` (``--peak-flops``), else the dense peak FLOP/s of ``gpu`` for ``dtype`` (``planning/hardware.py``)."""
    if given is not None:
        return given
    found = peak_flops(gpu, dtype)
    if found is None:
        raise PlanError(f"no {dtype} peak FLOP/s known for --gpu '{gpu}' (known: {', '.join(known_devices())}); "
                        "pass --peak-flops")
    return found
