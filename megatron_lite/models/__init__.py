"""Model families. ``build_model(cfg)`` returns an initialized ``DecoderLM`` for a ``ModelConfig``;
``build_encoder_decoder(cfg)`` an ``EncoderDecoderLM``."""

from megatron_lite.models.decoder import Block, DecoderLM, build_model
from megatron_lite.models.encoder_decoder import EncoderDecoderLM, build_encoder_decoder
from megatron_lite.models.presets import PRESETS, get_preset

__all__ = ["Block", "DecoderLM", "EncoderDecoderLM", "build_model", "build_encoder_decoder", "PRESETS", "get_preset"]
