"""megatron_lite: distributed pretraining of transformers."""

__version__ = "0.1.0"
