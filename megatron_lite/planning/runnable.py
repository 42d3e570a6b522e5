"""Whether training can run a layout, answered by training's own rules (``megatron_lite.rules``), not a copy of them.

A planned layout becomes the config training would be given (``engine_config``) and goes through
``rules.check_layout`` at the same world size on GPUs: the check the trainer runs before it builds anything (ZeRO-3
with TP, ZeRO-2/3 with PP, fp16 with PP or FSDP2, offload flags per engine, pipeline microbatch counts and stage
sizes, tensor-parallel divisibility of heads, kv heads, FFN and vocabulary, what expert parallelism needs), after the
config's own validation (``Config.validate``: what a model family supports, e.g. which layouts an encoder-decoder
runs). Its message is the reason a layout is refused. ``tests/planning/test_runnable.py`` checks, over a grid of
layouts and both families, that the planner refuses exactly what training refuses.

The way back, from a config to the settings it plans with (``planning/inputs.py``), reads the same keys
(``LAYOUT_KEYS``) and the same offload flags (``offload_keys`` and its inverse ``planned_offload``).
"""

from __future__ import annotations

import dataclasses

from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig, config_from_dict
from megatron_lite.planning.encdec import EncDecSpec, as_spec

ModelSpec = ModelConfig | EncDecSpec


# Where each planned setting (a ``Layout`` field) lives in a training config.
LAYOUT_KEYS: dict[str, str] = {
    "seq_len": "data.seq_len", "dtype": "training.precision", "global_batch": "training.global_batch_size",
    "micro_batch": "training.micro_batch_size", "engine": "parallel.engine", "tp": "parallel.tp", "pp": "parallel.pp",
    "cp": "parallel.cp", "ep": "parallel.ep",
    "sequence_parallel": "parallel.sequence_parallel", "schedule": "parallel.pp_schedule",
    "virtual_stages": "parallel.pp_virtual_stages", "dp_replicate": "parallel.dp_replicate",
    "zero": "parallel.zero_stage",
}


def offload_keys(engine: str, offload: str | None) -> dict[str, bool]:
    """The config's offload flags (dotted keys) for a planned ``offload`` (None, "optimizer" or "params").

    ``params`` under FSDP2 is ``parallel.fsdp_cpu_offload`` (FSDP2 offloads parameters, gradients and optimizer
    states together); under DeepSpeed it is ``offload_params`` with ``offload_optimizer`` (DeepSpeed offloads
    parameters only beside the optimizer).
    """
    if engine == "deepspeed":
        return {"parallel.offload_optimizer": offload in ("optimizer", "params"),
                "parallel.offload_params": offload == "params"}
    if offload == "params":
        return {"parallel.fsdp_cpu_offload": True}
    if offload == "optimizer":
        return {"parallel.offload_optimizer": True}  # refused by the check: FSDP2 has no optimizer-only offload
    return {}


def planned_offload(parallel: ParallelConfig) -> str | None:
    """What a config's offload flags plan as: the inverse of ``offload_keys``."""
    if parallel.offload_params or parallel.fsdp_cpu_offload:
        return "params"
    return "optimizer" if parallel.offload_optimizer else None


def _nested(flat: dict[str, object]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def engine_config(spec: ModelSpec, layout) -> Config:
    """The training config that runs ``layout`` (a ``planning.layout.Layout``): what ``launch/pretrain.py`` would read.

    Each setting goes to its ``LAYOUT_KEYS`` key (the ZeRO stage only under DeepSpeed) and ``offload`` to the flags
    ``offload_keys`` names. The model's position table is widened to the planned length so that a too-long
    ``--seq-len`` (a warning of its own) does not hide the layout's real problems. An encoder-decoder trains on
    seq2seq pairs of the layout's input and target lengths (span corruption would make the same shapes: the checks
    see lengths, not where the tokens come from).
    """
    spec = as_spec(spec)
    gb = layout.global_batch if layout.global_batch is not None else layout.dp * layout.micro_batch
    planned = {name: getattr(layout, name) for name in LAYOUT_KEYS}
    planned["global_batch"] = gb
    if layout.engine != "deepspeed":
        del planned["zero"]
    tree = _nested({**{LAYOUT_KEYS[name]: value for name, value in planned.items()},
                    **offload_keys(layout.engine, layout.offload),
                    "training.eval_samples": gb})  # evaluation splits like the global batch: a plan has no evaluation
    if isinstance(spec, EncDecSpec):
        tree["data"].update(objective="seq2seq", target_seq_len=layout.target_len)
        spec = spec.to_model_config()
    tree["model"] = dataclasses.asdict(spec)
    tree["model"]["max_seq_len"] = max(spec.max_seq_len, layout.seq_len, layout.target_len or 0)
    return config_from_dict(tree)


_ANSWERS: dict[tuple, str | None] = {}  # search asks for thousands of layouts that differ only in recomputation


def refusal(spec: ModelSpec, layout) -> str | None:
    """Why training would refuse ``layout`` for this model (one line), or None when it runs."""
    spec = as_spec(spec)
    key = (repr(spec), layout.gpus, layout.tp, layout.pp, layout.cp, layout.ep, layout.engine, layout.dp_replicate,
           layout.zero, layout.offload, layout.dtype,
           layout.schedule, layout.virtual_stages, layout.micro_batch, layout.global_batch, layout.seq_len,
           layout.target_len, layout.sequence_parallel)
    if key not in _ANSWERS:
        if len(_ANSWERS) > 10_000:
            _ANSWERS.clear()
        _ANSWERS[key] = _engine_refusal(spec, layout)
    return _ANSWERS[key]


def _engine_refusal(spec: ModelSpec, layout) -> str | None:
    from megatron_lite.rules import check_layout

    try:
        check_layout(engine_config(spec, layout), layout.gpus, "cuda")  # a planned run is on GPUs: offload is allowed
    except ConfigError as e:
        return str(e).splitlines()[0]
    return None
