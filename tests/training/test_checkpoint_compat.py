"""Checkpoints written before the blocks were keyed by index (``nn.ModuleList``) still load, and compute the same.

``tests/fixtures/checkpoint_v1_modulelist`` was written by the trainer's checkpoint code when ``layers`` was an
``nn.ModuleList``, with the logits that model gave for fixed inputs. The ``nn.ModuleDict`` keyed "0" .. "L-1" has the
same parameter names, so the checkpoint loads as it is, optimizer state included.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_lite.config import config_from_dict
from megatron_lite.engines.single import SingleEngine
from megatron_lite.families import get_family
from megatron_lite.topology import Topology
from megatron_lite.step.checkpoint_format import find_latest
from megatron_lite.training.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1_modulelist"


def test_modulelist_checkpoint_loads_and_gives_the_same_logits():
    path = find_latest(FIXTURE)
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    family = get_family(cfg.model.family)
    engine = SingleEngine(cfg, family.factory(cfg, Topology()), Topology(), family.task(cfg))
    meta = load_checkpoint(path, engine)
    assert meta["step"] == 1 and meta["consumed_samples"] == 2

    stored = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            stored.update({k: handle.get_tensor(k) for k in handle.keys()})
    state = engine.logical_state()
    assert set(state) == set(stored)
    assert any(k.startswith("model.layers.1.") for k in state)
    for key, value in state.items():
        assert torch.equal(value, stored[key]), key

    reference = load_file(str(FIXTURE / "reference_logits.safetensors"))
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(reference["input_ids"])
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-6)
