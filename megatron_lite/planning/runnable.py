"""Whether training can run a layout, answered by training's own rules (``megatron_lite.rules``), not a copy of them.

A planned layout becomes the config training would be given (``engine_config``) and goes through
``rules.check_layout`` at the same world size on GPUs: the check the trainer runs before it builds anything (ZeRO-3
with TP, ZeRO-2/3 with PP, fp16 with PP or FSDP2, offload flags per engine, pipeline microbatch counts and stage
sizes, tensor-parallel divisibility of heads, kv heads, FFN and vocabulary), after the config's own validation (``Config.validate``: what a model family supports, e.g. which layouts an encoder-decoder
runs). Its message is the reason a layout is refused. ``tests/planning/test_runnable.py`` checks, over a grid of
layouts and both families, that the planner refuses exactly what training refuses.
"""

from __future__ import annotations

import dataclasses

from megatron_lite.config import Config, ConfigError, ModelConfig, config_from_dict
from megatron_lite.planning.encdec import EncDecSpec, as_spec

ModelSpec = ModelConfig | EncDecSpec


def engine_config(spec: ModelSpec, layout) -> Config:
    """The training config that runs ``layout`` (a ``planning.layout.Layout``): what ``launch/pretrain.py`` would read.

    ``--offload params`` under FSDP2 is ``parallel.fsdp_cpu_offload`` (FSDP2 offloads parameters, gradients and
    optimizer states together); under DeepSpeed it is ``offload_params`` with ``offload_optimizer`` (DeepSpeed
    offloads parameters only beside the optimizer). The model's position table is widened to the planned length so
    that a too-long ``--seq-len`` (a warning of its own) does not hide the layout's real problems. An encoder-decoder
    trains on seq2seq pairs of the layout's input and target lengths (span corruption would make the same shapes:
    the checks see lengths, not where the tokens come from).
    """
    spec = as_spec(spec)
    par = {"engine": layout.engine, "tp": layout.tp, "pp": layout.pp, "sequence_parallel": layout.sequence_parallel,
           "pp_schedule": layout.schedule, "pp_virtual_stages": layout.virtual_stages,
           "dp_replicate": layout.dp_replicate}
    if layout.engine == "deepspeed":
        par["zero_stage"] = layout.zero
        par["offload_optimizer"] = layout.offload in ("optimizer", "params")
        par["offload_params"] = layout.offload == "params"
    elif layout.offload == "params":
        par["fsdp_cpu_offload"] = True
    elif layout.offload == "optimizer":
        par["offload_optimizer"] = True  # refused by the check: FSDP2 has no optimizer-only offload
    data: dict = {"seq_len": layout.seq_len}
    if isinstance(spec, EncDecSpec):
        data.update(objective="seq2seq", target_seq_len=layout.target_len)
        spec = spec.to_model_config()
    model = dataclasses.asdict(spec)
    model["max_seq_len"] = max(spec.max_seq_len, layout.seq_len, layout.target_len or 0)
    gb = layout.global_batch if layout.global_batch is not None else layout.dp * layout.micro_batch
    return config_from_dict({
        "model": model, "data": data,
        "training": {"precision": layout.dtype, "global_batch_size": gb, "micro_batch_size": layout.micro_batch,
                     "eval_samples": gb},  # evaluation splits like the global batch: a plan has no evaluation
        "parallel": par,
    })


_ANSWERS: dict[tuple, str | None] = {}  # search asks for thousands of layouts that differ only in recomputation


def refusal(spec: ModelSpec, layout) -> str | None:
    """Why training would refuse ``layout`` for this model (one line), or None when it runs."""
    spec = as_spec(spec)
    key = (repr(spec), layout.gpus, layout.tp, layout.pp, layout.engine, layout.dp_replicate, layout.zero,
           layout.offload, layout.dtype,
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
