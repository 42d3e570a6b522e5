"""Random numbers on split activations: masks that differ across tensor-parallel ranks, and replay on recompute.

Where activations are replicated over the group (no sequence parallelism: the residual stream), every rank must drop
the same elements, so the default generator is seeded the same on every rank of a group (the trainer seeds it from
the data-parallel and pipeline coordinates only). Where activations are split (attention heads; the sequence under
sequence parallelism), equal masks would correlate the shards, so such regions run under ``sharded_rng``: it draws one
number from the default generator (the same on every rank, so the streams stay in step), seeds a fork of the
generators from that number and the rank, and restores the default generators afterwards.

Activation checkpointing restores the default generator's state before recomputing a block, so the region draws the
same number again and replays the same masks: no separate tracker state has to be saved.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_SEED_RANGE = 2**62


@contextlib.contextmanager
def sharded_rng(tp_rank: int, device: torch.device) -> Iterator[None]:
    seed = int(torch.randint(0, _SEED_RANGE, (1,)))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + tp_rank) % 2**63)
        yield
