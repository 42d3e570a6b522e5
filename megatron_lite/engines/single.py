"""One process on one device: the reference every parallel layout is compared against.

It is the PyTorch engine with nothing wrapped or sharded: the whole model, fp32 master weights, torch AdamW.
"""

from __future__ import annotations

from megatron_lite.engines.torch_engine import TorchEngine


class SingleEngine(TorchEngine):
    """The whole model in one process; see ``TorchEngine``."""
