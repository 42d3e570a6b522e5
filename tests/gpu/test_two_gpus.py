"""The GPU paths that need two ranks on two GPUs (NCCL refuses two ranks on one): DeepSpeed ZeRO-1 with tensor
parallelism saving and resuming through CPU buffers under a CUDA mesh, fp16 loss scaling that agrees across
tensor-parallel ranks, and a lost peer under NCCL reported in one line. Skipped, with the reason, on one GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lite.parity import run_layout, run_ranks
from tests.gpu.conftest import GPU, needs_deepspeed

STEPS, SAVE_AT = 4, 2


@pytest.fixture(autouse=True)
def _two_gpus():
    if torch.cuda.device_count() < 2:  # through NVML (the suite's conftest): no CUDA context here
        pytest.skip("needs 2 GPUs (NCCL takes one rank per GPU)")


def test_zero1_tp2_checkpoint_resumes_on_its_layout_and_as_one_process(tiny_config, tmp_path):
    layout = "zero1-dp1-tp2"
    needs_deepspeed(layout)
    run = [*GPU, f"training.train_steps={STEPS}"]
    full = run_layout(layout, tiny_config, [*run, f"checkpoint.interval={SAVE_AT}"], timeout=300,
                      checkpoint_dir=tmp_path / "full").losses
    ckpt = tmp_path / "full" / f"step_{SAVE_AT:08d}"
    for resumed_as, rtol in ((layout, 2e-3), ("single", 1e-2)):  # another layout: other bf16 rounding
        resumed = run_layout(resumed_as, tiny_config, [*run, f"checkpoint.load={ckpt}"], timeout=300,
                             checkpoint_dir=tmp_path / f"resumed-{resumed_as}").losses
        assert len(resumed) == STEPS - SAVE_AT, resumed
        for got, want in zip(resumed, full[SAVE_AT:]):
            assert abs(got - want) <= rtol * abs(want), (resumed_as, resumed, full)


def _fp16_tp2(rank: int, config: str, out: str) -> None:
    """Two fp16 steps at tp 2 on CUDA; at the first, rank 1's shard of one attention weight gets an inf gradient."""
    from megatron_lite.config import load_config
    from megatron_lite.data import GlobalBatchLoader, build_datasets
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.topology import Topology

    cfg = load_config(config, ["parallel.engine=ddp", "parallel.tp=2", "training.precision=fp16"])
    topology = Topology.from_env(cfg.parallel, "cuda")
    family = get_family(cfg.model.family)
    engine = build_engine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
    data = build_datasets(cfg.data, {"train": 2 * cfg.global_batch_size}, log=lambda *_: None)["train"]
    batches = iter(GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, topology.dp_rank,
                                     topology.dp, 0, prefetch=0))
    params = dict(engine.model.named_parameters())
    sharded = sorted(name for name in engine.shards if name.endswith("attn.q_proj.weight"))[0]
    hook = params[sharded].register_hook(lambda g: torch.full_like(g, float("inf"))) if rank == 1 else None
    skipped = [engine.train_step(next(batches), lr=1e-2).skipped]
    if hook is not None:
        hook.remove()
    skipped.append(engine.train_step(next(batches), lr=1e-2).skipped)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"scale": engine.scaler.get_scale(), "skipped": skipped,
                   "norm_weight": params["final_norm.weight"].detach().cpu().tolist()}, f)


def test_fp16_tensor_parallel_ranks_agree_on_overflow_under_nccl(tiny_config, tmp_path):
    run_ranks(_fp16_tp2, 2, (tiny_config, str(tmp_path)), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["scale"] for r in ranks] == [32768.0, 32768.0], ranks
    assert [r["skipped"] for r in ranks] == [[True, False], [True, False]]
    assert ranks[0]["norm_weight"] == ranks[1]["norm_weight"]


TIMEOUT_S = 10.0


def _lost_peer(rank: int, out: str) -> None:
    """Rank 1 vanishes after the first collective; rank 0 keeps reducing until NCCL's failure reaches Python."""
    import os
    import time

    import torch.distributed as dist

    from megatron_lite.config import ParallelConfig
    from megatron_lite.topology import Topology
    from megatron_lite.training.cluster import apply_collective_timeout, explain_lost_peer, gather_hosts

    topo = Topology.from_env(ParallelConfig(timeout_s=600.0), "cuda")
    hosts = gather_hosts(topo)
    apply_collective_timeout(TIMEOUT_S)
    x = torch.ones(1, device=topo.device)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    if rank == 1:
        os._exit(0)  # a peer that is gone without a word
    start = time.monotonic()
    outcome: dict = {"environment": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")}
    try:
        for _ in range(1000):
            dist.all_reduce(x)
            x.item()  # waits for the collective
            time.sleep(0.1)
        outcome["error"] = None
    except Exception as e:  # noqa: BLE001 - the test records what the collective raised
        lost = explain_lost_peer(e, hosts, hosts[rank], TIMEOUT_S)
        outcome["error"] = str(lost) if lost else repr(e)
    outcome["waited"] = time.monotonic() - start
    with open(out, "w") as f:
        json.dump(outcome, f)
    os._exit(0)  # no teardown of a group whose communicators were aborted


def test_a_lost_peer_under_nccl_is_one_line(tmp_path):
    out = tmp_path / "outcome.json"
    run_ranks(_lost_peer, 2, (str(out),), timeout=240)
    outcome = json.loads(out.read_text())
    assert outcome["environment"] == "2", outcome
    assert outcome["error"] is not None and outcome["error"].startswith("rank 0 on "), outcome
    assert "got no answer within parallel.timeout_s=10 s" in outcome["error"] or "lost" in outcome["error"], outcome
    assert outcome["waited"] < TIMEOUT_S + 120, outcome  # the timeout, plus NCCL's flight-recorder wait at most
