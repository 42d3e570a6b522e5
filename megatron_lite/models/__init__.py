"""Model families. ``build_model(cfg)`` returns an initialized ``DecoderLM`` for a ``ModelConfig``."""

from megatron_lite.models.decoder import Block, DecoderLM, build_model
from megatron_lite.models.presets import PRESETS, get_preset

__all__ = ["Block", "DecoderLM", "build_model", "PRESETS", "get_preset"]
