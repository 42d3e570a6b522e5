"""The model-state part of the memory estimate equals, byte for byte, what our engines hold on 2 CPU ranks.

Each rank builds a small decoder through ``megatron_lite.engines.build_engine`` (DeepSpeed ZeRO 0-3 with a torch AdamW,
and FSDP2), trains one step so that the optimizer state exists, and on the second step measures at the moment the
optimizer step begins, when weights, gradients and optimizer states are all resident:

- weights: DeepSpeed ZeRO 0: the module's parameters; ZeRO 1/2: the flat (padded) parameter buffers; ZeRO 3: the
  parameter partitions plus the whole copies of persistent (small) tensors; FSDP2: the local shards of the DTensors;
- gradients: ZeRO 0 and FSDP2: ``.grad`` of each parameter (local shard); ZeRO 1/2: the reduced gradients of this
  rank's partition; ZeRO 3: the flat gradient-partition buffer;
- optimizer: the fp32 master partitions (ZeRO 1-3) and every tensor in the torch AdamW state (moments and steps).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from megatron_lite.config import config_from_dict
from megatron_lite.planning.layout import Layout
from megatron_lite.planning.memory import model_state_bytes
from megatron_lite.planning.params import decoder_shapes

MODEL = dict(vocab_size=101, pad_vocab_multiple=1, hidden_size=24, num_layers=2, num_heads=2, ffn_hidden_size=37,
             max_seq_len=16, bias=True, tie_embeddings=True)
CASES = [("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", 0)]


def _nbytes(tensors) -> int:
    """Bytes of distinct tensors (a tied or repeated tensor counts once); DTensors count their local shard."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            local = t.to_local() if hasattr(t, "to_local") else t
            seen[id(t)] = local.numel() * local.element_size()
    return sum(seen.values())


def _measure_deepspeed(eng) -> dict[str, int]:
    opt = eng.engine.optimizer
    params = list(eng.model.parameters())
    inner = getattr(opt, "optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if eng.stage == 0:
        return {"weights": _nbytes(params), "gradients": _nbytes(p.grad for p in params), "optimizer": _nbytes(state)}
    if eng.stage in (1, 2):
        grads = [g for group in opt.averaged_gradients.values() for g in group]  # views of this rank's partition
        return {"weights": _nbytes(opt.bit16_groups_flat), "gradients": _nbytes(grads),
                "optimizer": _nbytes(opt.single_partition_of_fp32_groups) + _nbytes(state)}
    whole = [p.data for p in params if p.data.numel() > 0]  # persistent tensors stay gathered
    return {"weights": _nbytes([p.ds_tensor for p in params]) + _nbytes(whole),
            "gradients": _nbytes([opt.grad_partitions_flat_buffer]),
            "optimizer": _nbytes(opt.fp32_partitioned_groups_flat) + _nbytes(state)}


def _measure_fsdp(eng) -> dict[str, int]:
    params = list(eng.model.parameters())
    state = [t for s in eng.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"weights": _nbytes(params), "gradients": _nbytes(p.grad for p in params), "optimizer": _nbytes(state)}


def _rank(rank: int, port: int, engine: str, zero: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from megatron_lite.engines import build_engine
    from megatron_lite.models.decoder import build_model
    from megatron_lite.topology import Topology
    from megatron_lite.training.loss import make_forward_loss

    cfg = config_from_dict({"model": MODEL, "data": {"seq_len": 16},
                            "training": {"precision": "fp32", "global_batch_size": 4, "micro_batch_size": 2,
                                         "device": "cpu"},
                            "parallel": {"engine": engine, "zero_stage": zero}})
    topo = Topology.from_env(cfg.parallel, "cpu")
    torch.manual_seed(0)
    eng = build_engine(cfg, build_model(cfg.model, "cpu"), topo, make_forward_loss())
    measured: dict[str, int] = {}
    target = eng.engine.optimizer if engine == "deepspeed" else eng.optimizer
    original = target.step

    def step(*args, **kwargs):
        if not measured:
            measured.update(_measure_deepspeed(eng) if engine == "deepspeed" else _measure_fsdp(eng))
        return original(*args, **kwargs)

    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(rank))
    mb = {"input_ids": ids, "labels": ids}
    eng.train_step([mb], lr=1e-3)
    target.step = step
    eng.train_step([mb], lr=1e-3)
    queue.put((rank, measured))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine,zero", CASES)
def test_model_states_match_engine(engine: str, zero: int) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(_free_port(), engine, zero, queue), nprocs=2, start_method="fork")
    measured = dict(queue.get() for _ in range(2))
    shapes = decoder_shapes(config_from_dict({"model": MODEL, "data": {"seq_len": 16}}).model)
    expected = model_state_bytes(shapes, Layout(gpus=2, engine=engine, zero=zero, dtype="fp32"))
    expected.pop("cpu")
    assert measured[0] == expected  # rank 0 is the most loaded (FSDP gives it the larger dim-0 chunks)
