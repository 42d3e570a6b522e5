"""The DeepSpeed JSON config, generated from ours so that every setting has exactly one owner.

Batch sizes, accumulation, clipping and precision come from the ``training`` section; ZeRO stage and offload from
``parallel``. The optimizer and the learning-rate schedule stay ours (a client ``torch.optim.AdamW`` whose learning
rate the engine sets each step), so the JSON has no ``optimizer`` or ``scheduler`` section. DeepSpeed clips and scales
the loss itself, so the engine never does either a second time.

``parallel.deepspeed_overrides`` is merged last (nested dicts merge key by key) for settings we do not model, such as
bucket sizes or the fp16 loss-scale window. Settings our sections own (``OWNED_KEYS``: batch sizes, optimizer,
schedule, clipping, which precision is enabled, ZeRO stage and offload devices), at any depth, are refused with a
message naming the config key to use instead.
"""

from __future__ import annotations

import copy
from typing import Any

from megatron_lite.config import Config, ConfigError, microbatches_per_rank

# Settings whose value must follow our config, as dotted paths into the DeepSpeed JSON. An override could only make
# DeepSpeed disagree with the data loader, the optimizer, the schedule or the other engines (e.g. clip twice, or scale
# the loss in a precision the rest of the run does not use). Everything else in the JSON may be overridden.
OWNED_KEYS = {
    "train_batch_size": "training.global_batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.global_batch_size / (micro_batch_size x data-parallel size)",
    "optimizer": "the optimizer section (a client torch AdamW is passed to DeepSpeed)",
    "scheduler": "the schedule section (the engine sets the learning rate each step)",
    "gradient_clipping": "training.grad_clip",
    "bf16.enabled": "training.precision",
    "fp16.enabled": "training.precision",
    "amp": "training.precision",
    "torch_autocast": "training.precision",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_param.device": "parallel.offload_params",
    "zero_optimization.offload_optimizer.device": "parallel.offload_optimizer",
}

NO_PRINT = 2**31 - 1  # DeepSpeed's own step logging is off: the trainer prints one line per log interval


def deepspeed_config(cfg: Config, dp_size: int, cp_size: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DeepSpeed config dict for ``cfg`` on ``dp_size`` data-parallel ranks, and the overrides that were applied.

    With context parallelism DeepSpeed's data axis is dp x cp ranks, each running the step's microbatches on its part
    of the same samples; its batch size check (train = micro x accumulation x ranks) counts every rank's part as a
    sample, so it is told ``cp_size`` times the global batch.
    """
    t, par = cfg.training, cfg.parallel
    gbs, mbs = cfg.global_batch_size, t.micro_batch_size
    accumulation = microbatches_per_rank(gbs, mbs, dp_size)
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if par.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": gbs * cp_size,
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": accumulation,
        # 0 disables clipping in DeepSpeed too. ZeRO-0 under our pipeline schedule clips itself (DeepSpeed's ZeRO-0
        # norm would count a tied embedding's two stage copies twice).
        "gradient_clipping": 0.0 if par.pp > 1 and par.zero_stage == 0 else float(t.grad_clip),
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling, as torch's GradScaler in the other engines
            "initial_scale_power": 16,
            "loss_scale_window": 2000,
            "hysteresis": 1,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        "steps_per_print": NO_PRINT,
        "wall_clock_breakdown": False,
    }
    if par.offload_optimizer or par.offload_params:
        # torch AdamW then steps on the CPU copies of the fp32 states. DeepSpeed would insist on its DeepSpeedCPUAdam
        # (faster for large models, but a C++ op compiled on first use); we keep one optimizer for every engine.
        ds["zero_force_ds_cpu_optimizer"] = False
    overrides = par.deepspeed_overrides or {}
    check_overrides(overrides)
    return merge(ds, overrides), copy.deepcopy(overrides)


def check_overrides(overrides: dict[str, Any], prefix: str = "") -> None:
    """Refuse an override of an owned setting, or of a whole section that holds one, naming our key to use instead."""
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if path in OWNED_KEYS:
            raise ConfigError(
                f"parallel.deepspeed_overrides.{path} is set from our config; use {OWNED_KEYS[path]} instead"
            )
        owned_inside = [k for k in OWNED_KEYS if k.startswith(path + ".")]
        if isinstance(value, dict):
            check_overrides(value, path + ".")
        elif owned_inside:  # a non-mapping replaces the whole section, owned settings included
            raise ConfigError(
                f"parallel.deepspeed_overrides.{path}={value!r} would replace {owned_inside[0]}, which is set from "
                f"our config; use {OWNED_KEYS[owned_inside[0]]} for it and give {path} as a mapping of other keys"
            )


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
