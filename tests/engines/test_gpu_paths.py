"""The GPU paths a CPU can check: where optimizer state lives after a load, tensor-parallel checkpoint views that
share memory with their buffers whatever the mesh's device, FSDP2's CPU offload building on the CPU, and fp16 loss
scaling that agrees across tensor-parallel ranks.

A device other than the CPU is stood in for by the meta device: tensors on it, or a device mesh typed ``meta``
under a fake process group, show the same device mismatches a CUDA run would.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from megatron_lite.engines.logical import ensure_adamw_state, ensure_adamw_state_for
from megatron_lite.parity import run_ranks


# ----------------------------------------------------------------------------------------------------------------------
# AdamW state after a load (fused AdamW on CUDA reads its step count on the parameter's device)
# ----------------------------------------------------------------------------------------------------------------------


def _torch_loaded(params: list[nn.Parameter], flags: dict) -> torch.optim.AdamW:
    """An AdamW whose state came through torch's own ``load_state_dict`` (the reference for where it lives)."""
    opt = torch.optim.AdamW(params, **flags)
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros(p.shape)}
             for i, p in enumerate(params)}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return opt


def _placement(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, tuple]:
    return {key: (value.device.type, value.dtype, tuple(value.shape)) for key, value in opt.state[p].items()}


@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"fused": True}, {"capturable": True}],
                         ids=["default", "for-loop", "fused", "capturable"])
def test_adamw_state_sits_where_torch_load_state_dict_puts_it(flags):
    # parameters on the meta device stand for a GPU's: a device that is not the CPU
    params = [nn.Parameter(torch.empty(4, 3, device="meta")), nn.Parameter(torch.empty(3, device="meta"))]
    ours = torch.optim.AdamW(params, **flags)
    ensure_adamw_state(ours)
    theirs = _torch_loaded(params, flags)
    for p in params:
        assert _placement(ours, p) == _placement(theirs, p)


def test_adamw_state_of_tensors_outside_the_groups_follows_the_defaults():
    """ZeRO-3 puts its flat partitions into the optimizer's groups only while it steps."""
    params = [nn.Parameter(torch.empty(3, device="meta"))]
    outside = torch.empty(5, device="meta")
    fused, plain = torch.optim.AdamW(params, fused=True), torch.optim.AdamW(params)
    ensure_adamw_state_for(fused, [outside])
    ensure_adamw_state_for(plain, [outside])
    assert fused.state[outside]["step"].device.type == "meta"
    assert plain.state[outside]["step"].device.type == "cpu"


def test_fused_adamw_steps_on_the_state_created_ahead_of_time():
    """torch 2.13 runs fused AdamW on the CPU: the state made before the first step is the state it steps."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    b.data.copy_(a.data)
    ahead, lazy = torch.optim.AdamW([a], fused=True), torch.optim.AdamW([b], fused=True)
    ensure_adamw_state(ahead)
    for _ in range(2):
        grad = torch.randn(6, 4)
        a.grad, b.grad = grad.clone(), grad.clone()
        ahead.step()
        lazy.step()
    assert torch.equal(a, b) and float(ahead.state[a]["step"]) == 2.0


# ----------------------------------------------------------------------------------------------------------------------
# Tensor-parallel checkpoint views on a mesh of another device (DeepSpeed's CPU buffers under a CUDA mesh)
# ----------------------------------------------------------------------------------------------------------------------


def _views_under_a_meta_mesh(rank: int, out: str) -> None:
    """Rank 0 of a fake (pp 1, dp 2, tp 2) job whose mesh is typed ``meta``: a device the CPU buffers are not on."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_lite.engines.logical import check_view_of, tensor_parallel_view
    from megatron_lite.parallel.tensor import TPShard
    from megatron_lite.topology import Topology

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    topo = Topology(world_size=4, pp=1, dp=2, tp=2)
    topo.mesh = init_device_mesh("meta", (1, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
    shard = TPShard(dim=0, rank=0, size=2, global_shape=(8, 3))
    result = {}

    buffer = torch.zeros(4, 3)  # a load buffer: this rank's tensor-parallel shard
    view = tensor_parallel_view(buffer, shard, topo)
    view.to_local().fill_(7.0)  # what DCP does when it reads into the view
    result["plain"] = {"device": view.to_local().device.type, "filled": bool((buffer == 7.0).all()),
                       "shape": list(view.shape)}

    # an FSDP shard kept on the CPU (CPUOffloadPolicy) within the tensor-parallel shard, on the dp mesh
    local = torch.zeros(2, 3)
    spec = DTensorSpec(topo.mesh["dp"], (Shard(0),), tensor_meta=TensorMeta(torch.Size((4, 3)), (3, 1), local.dtype))
    fsdp_param = DTensor(local, spec, requires_grad=False)
    view = tensor_parallel_view(fsdp_param, shard, topo)
    view.to_local().fill_(3.0)
    box = compute_local_shape_and_global_offset(view.shape, view.device_mesh, view.placements)
    result["fsdp"] = {"filled": bool((local == 3.0).all()), "box": [list(box[0]), list(box[1])]}

    # what DTensor.from_local makes of the same buffer: a copy on the mesh's device, which the check refuses
    copy = DTensor.from_local(buffer, topo.mesh_of("tp"), [Shard(0)], run_check=False, shape=torch.Size((8, 3)),
                              stride=(3, 1))
    try:
        check_view_of(copy, buffer)
        result["copy_error"] = None
    except RuntimeError as e:
        result["copy_error"] = str(e)
    with open(out, "w") as f:
        json.dump(result, f)


def test_tensor_parallel_views_fill_their_buffers_whatever_the_mesh_device(tmp_path):
    out = tmp_path / "views.json"
    run_ranks(_views_under_a_meta_mesh, 1, (str(out),), timeout=60)
    result = json.loads(out.read_text())
    assert result["plain"] == {"device": "cpu", "filled": True, "shape": [8, 3]}
    assert result["fsdp"] == {"filled": True, "box": [[2, 3], [0, 0]]}
    assert result["copy_error"].startswith("checkpoint view of a (4, 3) torch.float32 tensor on cpu is a copy on meta")


# ----------------------------------------------------------------------------------------------------------------------
# FSDP2 CPU offload: the shards are made on the CPU even when the rank trains on a GPU
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload, expected", [(True, "cpu"), (False, "cuda")])
def test_fsdp_materializes_on_the_cpu_under_cpu_offload(monkeypatch, offload, expected):
    from types import SimpleNamespace

    import megatron_lite.engines.materialize as materialize_module
    from megatron_lite.config import load_config
    from megatron_lite.engines.fsdp import FSDPEngine
    from megatron_lite.topology import Topology

    seen = []
    monkeypatch.setattr(materialize_module, "materialize", lambda model, rules, seed, device, *a: seen.append(device))
    engine = FSDPEngine.__new__(FSDPEngine)  # only its build steps: no process group, no model
    engine.cfg = load_config(None, ["parallel.engine=fsdp", f"parallel.fsdp_cpu_offload={str(offload).lower()}"])
    engine.topology = Topology(device=torch.device("cuda", 0))  # a GPU rank (the device is only named, never used)
    engine.materialize(nn.Linear(2, 2), {}, 0, SimpleNamespace(shards={}, aliases={}))
    assert [d.type for d in seen] == [expected]


# ----------------------------------------------------------------------------------------------------------------------
# fp16 with tensor parallelism: the ranks agree on every overflow
# ----------------------------------------------------------------------------------------------------------------------


def _fp16_tp_with_an_inf_on_rank_1(rank: int, config: str, out: str) -> None:
    """Two fp16 steps at tp 2; at the first, rank 1's shard of one attention weight gets an inf gradient."""
    from tests.engines.conftest import engine_and_batches

    engine, batches = engine_and_batches(config, ["parallel.engine=ddp", "parallel.tp=2", "training.precision=fp16"],
                                         steps=2)
    params = dict(engine.model.named_parameters())
    sharded = sorted(name for name in engine.shards if name.endswith("attn.q_proj.weight"))[0]
    hook = params[sharded].register_hook(lambda g: torch.full_like(g, float("inf"))) if rank == 1 else None
    skipped = [engine.train_step(next(batches), lr=1e-2).skipped]
    if hook is not None:
        hook.remove()
    skipped.append(engine.train_step(next(batches), lr=1e-2).skipped)
    replicated = params["final_norm.weight"].detach()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"scale": engine.scaler.get_scale(), "skipped": skipped, "norm_weight": replicated.tolist()}, f)


def test_fp16_tensor_parallel_ranks_skip_and_back_off_together(tiny_config, tmp_path):
    run_ranks(_fp16_tp_with_an_inf_on_rank_1, 2, (tiny_config, str(tmp_path)), timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["scale"] for r in ranks] == [32768.0, 32768.0], ranks  # both backed off once from 2**16
    assert [r["skipped"] for r in ranks] == [[True, False], [True, False]]
    assert ranks[0]["norm_weight"] == ranks[1]["norm_weight"]  # the replicated weight stayed replicated
