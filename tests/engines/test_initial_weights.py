"""Every layout starts from the same full weights: each tensor's initial value depends on the seed and its name only.

Engines build their model shard by shard (FSDP from the meta device, ZeRO-3 inside ``zero.Init``), so each rank draws
only its own part. Saved before any step, the logical checkpoint holds the weights assembled to full tensors; they
must equal, byte for byte, the one-process model built from the same seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.engines import build_engine
from megatron_lite.step.checkpoint_format import logical_keys, read_logical
from megatron_lite.families import get_family
from megatron_lite.models import build_model
from megatron_lite.models.init import BLOCK
from megatron_lite.parity import parse_layout, run_ranks
from megatron_lite.topology import Topology

# Shapes chosen to be awkward: 2 ranks split no dimension evenly, and the embedding spans two random blocks.
MODEL = ["model.vocab_size=8000", "model.pad_vocab_multiple=64", "model.hidden_size=144", "model.num_layers=3",
         "model.num_heads=3", "model.num_kv_heads=1", "model.ffn_hidden_size=101", "model.max_seq_len=64",
         "model.position=rotary", "model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
         "model.tie_embeddings=true", "data.seq_len=16", "training.global_batch_size=2", "training.seed=7"]


def _save_initial(rank: int, overrides: list[str], path: str) -> None:
    cfg = load_config(None, [*MODEL, *overrides])
    family = get_family(cfg.model.family)
    topology = Topology.from_env(cfg.parallel, "cpu")
    engine = build_engine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
    engine.save(Path(path))


def _model_tensors(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors as full tensors in this process (DCP assembles the ranks' shards)."""
    assert {k for k in logical_keys(path) if k.startswith("model.")} == {f"model.{k}" for k in like}
    state = {f"model.{k}": torch.full_like(v, float("nan")) for k, v in like.items()}
    read_logical(state, path)
    return {k[len("model."):]: v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["single", "fsdp2", "zero3", "zero1"])
def test_initial_weights_are_identical_across_layouts(layout, tmp_path):
    cfg = load_config(None, MODEL)
    reference = build_model(cfg.model, seed=cfg.training.seed).state_dict()
    assert reference["embed.weight"].numel() > BLOCK  # a shard boundary falls inside a block, another between two
    parsed = parse_layout(layout)
    run_ranks(_save_initial, parsed.world_size, (parsed.overrides, str(tmp_path / layout)), timeout=300)
    got = _model_tensors(tmp_path / layout, reference)
    for name, ref in reference.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], ref), name


def test_initial_values_depend_on_seed_and_name_only():
    cfg = load_config(None, MODEL)
    a = build_model(cfg.model, seed=7).state_dict()
    b = build_model(cfg.model, seed=8).state_dict()
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], b["layers.0.attn.q_proj.weight"])
    # Same shape, same rule, different names: different values.
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], a["layers.1.attn.q_proj.weight"])
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(build_model(cfg.model, seed=7).state_dict()["embed.weight"], a["embed.weight"])
