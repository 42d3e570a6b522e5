"""--from deepspeed: checkpoints written by DeepSpeed's own save_checkpoint (ZeRO 1-3, 2 gloo ranks, two optimizer
groups, a tied head) import with the same fp32 weights and AdamW moments, without running pickle code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_lite.parity import run_ranks
from tests.convert.conftest import convert, hf_tensors

STAGES = (1, 2, 3)


class Note:
    """A client-state object only pickle can restore (the reason --trust-pickle exists)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _save_native(rank: int, config: str, out: str) -> None:
    """Train the tiny model 2 steps under plain deepspeed.initialize per ZeRO stage; save DeepSpeed's checkpoint,
    and on rank 0 the full fp32 weights and moments DeepSpeed reports (the reference)."""
    from megatron_lite.engines.deepspeed import import_deepspeed

    deepspeed = import_deepspeed(torch.device("cpu"))  # as training imports it: the CPU accelerator, nothing compiled
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from megatron_lite.config import load_config
    from megatron_lite.models import build_model

    cfg = load_config(config).model
    for stage in STAGES:
        model = build_model(cfg, seed=0)
        decay = [p for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "embed.weight"]
        rest = [p for n, p in model.named_parameters() if not (n.endswith("proj.weight") or n == "embed.weight")]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                      lr=1e-2)
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
            logits = engine(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
        client = {"note": Note("hello")} if stage == 2 else {}
        engine.save_checkpoint(f"{out}/zero{stage}", client_state=client)
        opt = engine.optimizer  # DeepSpeed links only its first group's fragments to the moments; link them all
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        reference = {}
        for name, p in engine.module.named_parameters():
            moments = [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
            values = [safe_get_full_fp32_param(p), *moments]
            for key, value in zip(("model", "exp_avg", "exp_avg_sq"), values):
                reference[f"{key}.{name}"] = value.detach().clone().reshape(p.ds_shape if stage == 3 else p.shape)
        if rank == 0:
            save_file(reference, f"{out}/zero{stage}-reference.safetensors")


@pytest.fixture(scope="module")
def native(tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed-native")
    run_ranks(_save_native, 2, (tiny_config, str(out)), timeout=300)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_native_zero_checkpoint_imports_with_the_same_weights_and_moments(stage, native, tiny_config, tmp_path,
                                                                          capsys):
    source = native / f"zero{stage}"
    extra = ["--trust-pickle"] if stage == 2 else []  # stage 2 holds a pickled client object (next test)
    rc, out, err = convert("--from", "deepspeed", source, "--config", tiny_config, "--output", tmp_path / "ours",
                           *extra, capsys=capsys)
    assert rc == 0, err
    from safetensors.torch import load_file

    reference = load_file(str(native / f"zero{stage}-reference.safetensors"))
    got = hf_tensors(tmp_path / "ours")
    for key, value in reference.items():
        kind, name = key.split(".", 1)
        ours = got[f"model.{name}"] if kind == "model" else got[f"optim.{name}.{kind}"]
        assert torch.equal(ours, value), key
    assert torch.equal(got["model.lm_head.weight"], got["model.embed.weight"])  # tied: under both names
    assert {float(v) for k, v in got.items() if k.endswith(".step")} == {2.0}
    meta = json.loads((tmp_path / "ours" / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"], meta["imported_from"]["zero_stage"]) == (2, 8, stage)


def test_pickled_objects_are_refused_without_trust_pickle(native, tiny_config, tmp_path, capsys):
    rc, _, err = convert("--from", "deepspeed", native / "zero2", "--config", tiny_config, "--output", tmp_path / "o",
                         capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "mp_rank_00_model_states.pt: loading needs pickle to build tests.convert.test_deepspeed_native.Note" in err
    assert "--trust-pickle" in err and not (tmp_path / "o").exists()
    # the optimizer files hold only DeepSpeed's own records: read without pickle code
    rc, _, err = convert("--from", "deepspeed", native / "zero3", "--config", tiny_config, "--output", tmp_path / "3",
                         capsys=capsys)
    assert rc == 0, err
