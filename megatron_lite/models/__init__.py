"""The model families, plain single-process PyTorch that knows nothing of parallelism: the decoder (GPT-2 and Llama
styles) and the encoder-decoder (T5 and the original Transformer). Each builds itself from a ``ModelConfig``
(``construct``, on the current device; ``build_model`` / ``build_encoder_decoder`` with initial values) and states
what parallel code needs to know about it as data or small methods beside its code: its tensor-parallel plan
(``TP_PLAN``) and its pipeline stages (``stage_parts``, ``stage_costs``, ``as_stage``)."""

from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.errors import ConfigError
from megatron_lite.models.decoder import Block, DecoderLM, build_model
from megatron_lite.models.encoder_decoder import EncoderDecoderLM, build_encoder_decoder
from megatron_lite.models.presets import PRESETS, get_preset

MODEL_CLASSES: dict[str, type[nn.Module]] = {"decoder": DecoderLM, "encoder_decoder": EncoderDecoderLM}


def model_class(family: str) -> type[nn.Module]:
    """The class of ``model.family``."""
    if family not in MODEL_CLASSES:
        raise ConfigError(f"model.family={family!r} is not one of {', '.join(map(repr, MODEL_CLASSES))}")
    return MODEL_CLASSES[family]


def construct(cfg: ModelConfig) -> nn.Module:
    """The plain model of ``cfg`` with parameters on the current device and no values drawn (engines build it under
    ``torch.device("meta")`` and materialize what a rank holds)."""
    cls = model_class(cfg.family)
    cfg.validate()
    return cls(cfg)


__all__ = ["Block", "DecoderLM", "EncoderDecoderLM", "MODEL_CLASSES", "PRESETS", "build_encoder_decoder",
           "build_model", "construct", "get_preset", "model_class"]
