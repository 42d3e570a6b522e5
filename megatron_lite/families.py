"""The model families, keyed by ``model.family``: how to construct each one, its task, and its Hugging Face adapter.

The trainer, the parity harness (through the trainer) and ``tools/plan.py`` look a family up here rather than assume
a decoder, so a new family is one entry: its constructor, task, HF adapter and tensor-parallel plan. A family's model must provide ``init_rules()`` (the initial value of every
parameter by name, ``models/init.py``) and a ``layers`` ModuleDict of its repeated blocks (what activation
checkpointing, compile and FSDP wrap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from megatron_lite.config import Config, ConfigError, ModelConfig
from megatron_lite.engines.base import ModelFactory
from megatron_lite.parallel.plans import DECODER_PLAN, ENCODER_DECODER_PLAN, TPPlan
from megatron_lite.parallel.wrappers import prepare_model
from megatron_lite.topology import Topology
from megatron_lite.training.tasks import Task, causal_lm_task, seq2seq_task


@dataclass(frozen=True)
class Family:
    name: str
    construct: Callable[[ModelConfig], nn.Module]  # creates the plain model on the current device (engines: meta)
    task: Callable[[Config, Topology], Task]  # the training objective for a config on this rank's layout
    hf_adapter: str  # module with config_from_hf / config_to_hf / from_hf / to_hf for this family
    tp_plan: TPPlan | None = None  # module name -> tensor-parallel placement (parallel/plans.py)

    def factory(self, cfg: Config, topology: Topology) -> ModelFactory:
        """What an engine needs to build this family's model for ``cfg``, shard by shard."""
        return ModelFactory(
            construct=lambda: self.construct(cfg.model),
            seed=cfg.training.seed,
            prepare=lambda m: prepare_model(m, cfg, topology, self.tp_plan),
        )


def _decoder(cfg: ModelConfig) -> nn.Module:
    from megatron_lite.models.decoder import DecoderLM

    cfg.validate()
    return DecoderLM(cfg)


def _encoder_decoder(cfg: ModelConfig) -> nn.Module:
    from megatron_lite.models.encoder_decoder import EncoderDecoderLM

    cfg.validate()
    return EncoderDecoderLM(cfg)


FAMILIES: dict[str, Family] = {
    "decoder": Family("decoder", _decoder, causal_lm_task, "megatron_lite.convert.hf", DECODER_PLAN),
    "encoder_decoder": Family("encoder_decoder", _encoder_decoder, seq2seq_task, "megatron_lite.convert.t5",
                              ENCODER_DECODER_PLAN),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is not one of {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[name]
