"""The model-state part of the memory estimate equals, byte for byte, what our engines hold on 2 CPU ranks.

Both precisions are measured: fp32, and bf16 (the default for estimates; DeepSpeed's CPU accelerator runs bf16).

Each rank builds a small decoder through ``megatron_lite.engines.build_engine`` (DeepSpeed ZeRO 0-3 with a torch AdamW,
and FSDP2), trains one step so that the optimizer state exists, and on the second step measures at the moment the
optimizer step begins, when weights, gradients and optimizer states are all resident:

- weights: DeepSpeed ZeRO 0: the module's parameters; ZeRO 1/2: the flat (padded) parameter buffers; ZeRO 3: the
  parameter partitions plus the whole copies of persistent (small) tensors; FSDP2: the local shards of the DTensors;
- gradients: ZeRO 0 and FSDP2: ``.grad`` of each parameter (local shard); ZeRO 1/2: the reduced gradients of this
  rank's partition; ZeRO 3: the flat gradient-partition buffer;
- optimizer: the fp32 masters (ZeRO 0 in bf16: the unfused optimizer's ``fp32_groups``; ZeRO 1-3: the fp32
  partitions) and every tensor in the torch AdamW state (moments and steps);
- step gradients (ZeRO 1-3): the largest fp32 gradient DeepSpeed hands the optimizer inside the step, one parameter
  group (ZeRO 1/2) or sub-group (ZeRO 3) at a time, read as each group's ``_optimizer_step`` begins;
- with the optimizer (and parameters) offloaded, ZeRO 2/3 in bf16: what DeepSpeed keeps on the accelerator side
  (16-bit weights, persistent tensors) and what it allocates on the offload device (fp32 partitions and their
  gradients, the AdamW state, ZeRO-2's 16-bit host copy of the partition, ZeRO-3's gradient partition buffer and,
  with parameters offloaded, the 16-bit partitions). On CPU ranks both sides are host memory; the tensors are told
  apart by what DeepSpeed allocates for each, and the bytes of each side equal the estimate's.
"""

from __future__ import annotations

import importlib
import os
import socket
import warnings

import pytest
import torch

from megatron_lite.config import config_from_dict
from megatron_lite.planning.layout import Layout
from megatron_lite.planning.memory import model_state_bytes
from megatron_lite.planning.params import decoder_shapes

MODEL = dict(vocab_size=101, pad_vocab_multiple=1, hidden_size=24, num_layers=2, num_heads=2, ffn_hidden_size=37,
             max_seq_len=16, bias=True, tie_embeddings=True)
ENGINES = [("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", 0)]
CASES = [(engine, zero, dtype) for dtype in ("fp32", "bf16") for engine, zero in ENGINES]


def _nbytes(tensors) -> int:
    """Bytes of distinct tensors (a tied or repeated tensor counts once); DTensors count their local shard."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            local = t.to_local() if hasattr(t, "to_local") else t
            seen[id(t)] = local.numel() * local.element_size()
    return sum(seen.values())


def _measure_offloaded(eng) -> dict[str, int]:
    """DeepSpeed with the optimizer (and parameters) offloaded: which tensors stay on the accelerator and which move to
    the host. On CPU ranks both are host memory, so the tensors are classified by what DeepSpeed allocates for each
    side (the device of a buffer is the offload device, the CPU, either way)."""
    opt = eng.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if eng.stage in (1, 2):
        fp32 = opt.single_partition_of_fp32_groups
        host = _nbytes(fp32) + _nbytes(p.grad for p in fp32) + _nbytes(state)
        host += _nbytes(opt.param_buffer_of_bit16_for_cpu_offload_groups)
        return {"weights": _nbytes(opt.bit16_groups_flat), "gradients": 0, "optimizer": 0, "cpu": host}
    params = list(eng.model.parameters())
    fp32 = opt.fp32_partitioned_groups_flat
    host = _nbytes(fp32) + _nbytes(p.grad for p in fp32) + _nbytes(state) + _nbytes([opt.grad_partitions_flat_buffer])
    partitions = _nbytes([p.ds_tensor for p in params])
    whole = _nbytes([p.data for p in params if p.data.numel() > 0])  # persistent tensors stay gathered
    offload_params = eng.cfg.parallel.offload_params
    return {"weights": whole + (0 if offload_params else partitions), "gradients": 0, "optimizer": 0,
            "cpu": host + (partitions if offload_params else 0)}


def _measure_deepspeed(eng) -> dict[str, int]:
    opt = eng.engine.optimizer
    if eng.cfg.parallel.offload_optimizer:
        return _measure_offloaded(eng)
    params = list(eng.model.parameters())
    inner = getattr(opt, "optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if eng.stage == 0:  # bf16/fp16: DeepSpeed's unfused optimizer keeps an fp32 master per parameter (fp32_groups)
        masters = [t for group in getattr(opt, "fp32_groups", []) for t in group]
        return {"weights": _nbytes(params), "gradients": _nbytes(p.grad for p in params),
                "optimizer": _nbytes(masters) + _nbytes(state)}
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


def _measure_accumulated(eng, engine: str) -> dict[str, int]:
    """Gradient bytes held between the microbatches of a step (after a backward, before the next forward).

    ZeRO 1 accumulates in each parameter's ``.grad``; FSDP2 keeps the unsharded gradients of every FSDP unit until
    the last microbatch reduce-scatters them. They live in FSDP's private per-unit state, read here through
    ``_get_fsdp_state`` (torch 2.6+; the test skips if that changes).
    """
    if engine == "deepspeed":
        return {"gradients": _nbytes(p.grad for p in eng.model.parameters())}
    grads = []
    for module in eng.model.modules():
        group = getattr(module, "_get_fsdp_state", lambda: None)()
        group = getattr(group, "_fsdp_param_group", None)
        if group is None:
            continue
        for fp in group.fsdp_params:
            acc = getattr(fp, "unsharded_accumulated_grad", None)
            grads.append(acc if acc is not None else fp._unsharded_param.grad)
    if not grads:
        pytest.skip("FSDP2's per-unit state moved; cannot read the accumulated gradients")
    return {"gradients": _nbytes(grads)}


def _rank(rank: int, port: int, engine: str, zero: int, dtype: str, microbatches: int, queue,
          offload: str | None = None) -> None:
    """Train two steps of ``microbatches`` microbatches (2 sequences each); measure during the second step: at the
    start of the optimizer step (one microbatch), or before the last microbatch's forward (accumulation)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.topology import Topology
    from megatron_lite.step.tasks import CausalLMTask

    cfg = config_from_dict({"model": MODEL, "data": {"seq_len": 16},
                            "training": {"precision": dtype, "global_batch_size": 4 * microbatches,
                                         "micro_batch_size": 2, "device": "cpu"},
                            "parallel": {"engine": engine, "zero_stage": zero,
                                         "offload_optimizer": offload is not None,
                                         "offload_params": offload == "params"}})
    topo = Topology.from_env(cfg.parallel, "cpu")
    torch.manual_seed(0)
    measured: dict[str, int] = {}
    step_grads: dict[str, int] = {}
    calls = [0]

    class CountedTask(CausalLMTask):
        def inputs(self, mb):
            calls[0] += 1
            if microbatches > 1 and calls[0] == 2 * microbatches and not measured:  # the last one of step 2
                measured.update(_measure_accumulated(eng, engine))
            return super().inputs(mb)

    eng = build_engine(cfg, get_family("decoder").factory(cfg, topo), topo, CountedTask())
    target = eng.engine.optimizer if engine == "deepspeed" else eng.optimizer
    original = target.step

    def step(*args, **kwargs):
        if not measured:
            measured.update(_measure_deepspeed(eng) if engine == "deepspeed" else _measure_fsdp(eng))
        return original(*args, **kwargs)

    if engine == "deepspeed" and zero > 0 and offload is None:  # the fp32 gradient each group's step is given
        inner_step = target._optimizer_step
        fp32 = target.single_partition_of_fp32_groups if zero < 3 else target.fp32_partitioned_groups_flat

        def group_step(i):
            step_grads["step_gradients"] = max(step_grads.get("step_gradients", 0), _nbytes([fp32[i].grad]))
            return inner_step(i)

        target._optimizer_step = group_step
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(rank))
    mbs = [{"input_ids": ids, "labels": ids}] * microbatches
    eng.train_step(mbs, lr=1e-3)
    target.step = step
    eng.train_step(mbs, lr=1e-3)
    queue.put((rank, {**measured, **(step_grads if microbatches == 1 else {})}))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _imported_before_fork() -> None:
    """Import what every rank imports (DeepSpeed's ZeRO modules pull in torch._dynamo and inductor) once, in the
    parent, so that the forked ranks inherit it: this takes most of each case's time otherwise."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("megatron_lite.engines", "megatron_lite.engines.deepspeed", "megatron_lite.engines.fsdp",
                 "megatron_lite.models.decoder", "megatron_lite.step.loss", "torch.distributed.fsdp",
                 "torch._dynamo", "torch._inductor.compile_fx", "deepspeed", "deepspeed.runtime.engine",
                 "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                 "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.fp16.unfused_optimizer"):
        with warnings.catch_warnings():  # third-party deprecation notices at import time are not this test's
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            try:
                importlib.import_module(name)
            except ImportError:  # only a speed-up; the ranks import (or skip) a missing module as before
                pass


def _run(engine: str, zero: int, dtype: str, microbatches: int, offload: str | None = None) -> dict[str, int]:
    """Rank 0's measurement (the most loaded: FSDP gives it the larger dim-0 chunks)."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_rank, args=(_free_port(), engine, zero, dtype, microbatches, queue, offload), nprocs=2,
                       start_method="fork")
    return dict(queue.get() for _ in range(2))[0]


def _expected(engine: str, zero: int, dtype: str, microbatches: int, offload: str | None = None) -> dict[str, int]:
    shapes = decoder_shapes(config_from_dict({"model": MODEL, "data": {"seq_len": 16}}).model)
    layout = Layout(gpus=2, engine=engine, zero=zero, dtype=dtype, micro_batch=2, global_batch=4 * microbatches,
                    offload=offload)
    expected = model_state_bytes(shapes, layout)
    if engine != "deepspeed" or zero == 0 or offload:
        expected.pop("step_gradients")  # measured for ZeRO 1-3 inside the step, one group or sub-group at a time
    if not offload:
        expected.pop("cpu")
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("engine,zero,dtype", CASES)
def test_model_states_match_engine(engine: str, zero: int, dtype: str) -> None:
    assert _run(engine, zero, dtype, 1) == _expected(engine, zero, dtype, 1)


@pytest.mark.slow
@pytest.mark.parametrize("zero,offload", [(2, "optimizer"), (3, "optimizer"), (3, "params")])
def test_offloaded_states_match_engine(zero: int, offload: str) -> None:
    """DeepSpeed offload on CPU ranks (bf16, torch AdamW stepping on the host copies): the bytes left on the device
    side and those on the host side, tensor by tensor, equal the estimate. FSDP2's CPUOffloadPolicy cannot run on
    CPU ranks (the engine refuses it: parameters already live in host memory), so its rule is not measured here."""
    assert _run("deepspeed", zero, "bf16", 1, offload) == _expected("deepspeed", zero, "bf16", 1, offload)


@pytest.mark.slow
@pytest.mark.parametrize("engine,zero", [("deepspeed", 1), ("fsdp", 0)])
def test_accumulated_gradients_match_engine(engine: str, zero: int) -> None:
    """With 2 microbatches per step ZeRO 1 holds whole gradients and FSDP2 unsharded fp32 ones until the last."""
    measured = _run(engine, zero, "bf16", 2)
    expected = _expected(engine, zero, "bf16", 2)
    assert measured["gradients"] == expected["gradients"]
    assert expected["gradients"] > _expected(engine, zero, "bf16", 1)["gradients"]  # more than the partition
