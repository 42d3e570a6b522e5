"""``checkpoint.init_from``: start a run from another checkpoint's weights, with a new optimizer, schedule and data
position (fine-tuning, continued pretraining on other data).

Rank 0 writes the source's weights with a fresh optimizer state as a logical checkpoint (``convert/init_from.py``) in
a temporary directory under the checkpoint root, which every rank can see; every engine then loads it the way it
loads any checkpoint, resharding to its own layout, and the directory is removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from megatron_lite.config import Config
from megatron_lite.convert.errors import ConvertError
from megatron_lite.convert.init_from import write_weights_with_fresh_optimizer
from megatron_lite.engines.base import Engine


def init_weights(source: str | Path, engine: Engine, config: Config, ckpt_root: Path,
                 log: Callable[[str], None] = print) -> None:
    """Load ``source``'s weights into ``engine`` (all ranks call this); the optimizer, schedule and data stay new."""
    topo = engine.topology
    tmp = Path(ckpt_root) / ".init_from"
    error = ""  # ConvertError's message on rank 0, raised on every rank
    if topo.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_weights_with_fresh_optimizer(Path(source), tmp, config)
        except ConvertError as e:
            error = str(e)
    if topo.is_distributed:  # every rank learns of rank 0's failure, and raises the same line
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        if topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(error)
    try:
        engine.load(tmp)
    finally:
        if topo.is_distributed:
            dist.barrier()
        if topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"initialized the weights from {source} (new optimizer state, schedule and data position)")
