"""The model families as training sees them, keyed by ``model.family``: the model (``models.construct``), its task
(``step.tasks.task_for``), its Hugging Face adapter (``convert.hf_dir.HF_ADAPTERS``) and how an engine builds it.

Each answer lives in its own layer, so ``planning/`` and ``convert/`` ask ``models/`` directly; this module only
gathers them for the trainer, the parity harness and the tools. A new family is a model class with ``init_rules()``, a
``layers`` ModuleDict of blocks, a ``TP_PLAN`` and its pipeline-stage methods (``models/``), a task, and an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from megatron_lite.config import Config, ModelConfig
from megatron_lite.convert.hf_dir import HF_ADAPTERS
from megatron_lite.engines.build import ModelFactory
from megatron_lite.models import construct, model_class
from megatron_lite.parallel.wrappers import prepare_model
from megatron_lite.step.tasks import Task, task_for
from megatron_lite.topology import Topology


@dataclass(frozen=True)
class Family:
    name: str

    def construct(self, cfg: ModelConfig) -> nn.Module:
        """The plain model on the current device (engines: meta)."""
        return construct(cfg)

    def task(self, cfg: Config, topology: Topology | None = None) -> Task:
        """The training objective for ``cfg`` on this rank's layout."""
        return task_for(cfg, topology)

    @property
    def hf_adapter(self) -> str:
        """The module with config_from_hf / config_to_hf / from_hf / to_hf for this family."""
        return HF_ADAPTERS[self.name]

    def factory(self, cfg: Config, topology: Topology) -> ModelFactory:
        """What an engine needs to build this family's model for ``cfg``, shard by shard."""
        return ModelFactory(
            construct=lambda: construct(cfg.model),
            seed=cfg.training.seed,
            prepare=lambda m: prepare_model(m, cfg, topology),
        )


def get_family(name: str) -> Family:
    model_class(name)  # an unknown family fails here, naming the known ones
    return Family(name)
