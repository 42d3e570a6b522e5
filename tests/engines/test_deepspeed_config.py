"""The DeepSpeed JSON comes from our config: each setting once, overrides merged last."""

from __future__ import annotations

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.engines.deepspeed_config import deepspeed_config, merge


def _ds(*overrides: str, dp: int = 2) -> tuple[dict, dict]:
    base = ["parallel.engine=deepspeed", "training.global_batch_size=16", "training.micro_batch_size=2"]
    return deepspeed_config(load_config(None, [*base, *overrides]), dp)


def test_batches_clipping_and_stage():
    ds, applied = _ds("parallel.zero_stage=2", "training.grad_clip=0.5")
    batches = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert batches == (16, 2, 4)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: client AdamW, LR set per step
    assert applied == {}


def test_precision_sections():
    assert _ds("training.precision=bf16")[0]["bf16"]["enabled"]
    fp16 = _ds("training.precision=fp16")[0]["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic, done by DeepSpeed and nowhere else


def test_clipping_disabled():
    assert _ds("training.grad_clip=0")[0]["gradient_clipping"] == 0.0


def test_offload_keeps_the_client_optimizer():
    ds, _ = _ds("parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true")
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_overrides_merge_last_and_are_reported():
    ds, applied = _ds(
        "parallel.zero_stage=3",
        "parallel.deepspeed_overrides={zero_optimization: {reduce_bucket_size: 1000}, steps_per_print: 10}",
    )
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert ds["steps_per_print"] == 10
    assert applied == {"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 10}


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = merge(base, {"a": {"b": 5}, "d": {"x": 1}})
    assert out == {"a": {"b": 5, "c": 2}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


@pytest.mark.parametrize(
    "override, key, use",
    [
        ("{gradient_clipping: 0.0}", "gradient_clipping", "training.grad_clip"),
        ("{bf16: {enabled: true}}", "bf16.enabled", "training.precision"),
        ("{fp16: {enabled: true, loss_scale_window: 100}}", "fp16.enabled", "training.precision"),
        ("{bf16: true}", "bf16", "training.precision"),  # a non-mapping replaces the section, 'enabled' included
        ("{zero_optimization: {stage: 3}}", "zero_optimization.stage", "parallel.zero_stage"),
        ("{zero_optimization: {offload_param: {device: cpu}}}", "zero_optimization.offload_param.device",
         "parallel.offload_params"),
        ("{zero_optimization: {offload_optimizer: {device: cpu}}}", "zero_optimization.offload_optimizer.device",
         "parallel.offload_optimizer"),
        ("{zero_optimization: {offload_optimizer: none}}", "zero_optimization.offload_optimizer",
         "parallel.offload_optimizer"),
        ("{optimizer: {type: Adam}}", "optimizer", "the optimizer section"),
    ],
)
def test_overrides_cannot_reset_settings_we_own(override, key, use):
    with pytest.raises(ConfigError) as info:
        _ds("parallel.zero_stage=1", f"parallel.deepspeed_overrides={override}")
    message = str(info.value)
    assert message.startswith(f"parallel.deepspeed_overrides.{key}") and use in message, message
    assert "\n" not in message


def test_overrides_of_settings_we_do_not_model_are_allowed():
    ds, _ = _ds(
        "parallel.zero_stage=3",
        "parallel.offload_params=true",
        "parallel.deepspeed_overrides={fp16: {loss_scale_window: 100}, bf16: {immediate_grad_update: true}, "
        "zero_optimization: {reduce_bucket_size: 1000, offload_param: {pin_memory: true}}}",
    )
    assert ds["fp16"]["loss_scale_window"] == 100 and ds["bf16"]["immediate_grad_update"] is True
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0
