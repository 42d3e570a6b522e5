"""Mixtures of experts and Hugging Face: Mixtral and Qwen2-MoE convert both ways (configs, fused and per-expert
weights, directories through tools/convert_checkpoint.py), give HF's logits and greedy tokens, round-trip bit-exactly,
and what HF cannot express is refused naming the key."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lite.convert import hf
from megatron_lite.models import build_model
from tests.convert.conftest import convert, hf_tensors, load_ours, round_trip_through_hf

transformers = pytest.importorskip("transformers")

KINDS = ("mixtral", "qwen2_moe")


def reference(kind: str, **overrides):
    """A tiny HF model with fixed weights: Mixtral with 4 experts (top 2) in both layers; Qwen2-MoE with a mixture
    in layer 1 only (decoder_sparse_step 2), a gated shared expert of two experts' width, q/k/v biases."""
    common = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.15, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                            router_aux_loss_coef=0.02, **overrides)
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64, num_experts=4, decoder_sparse_step=2,
                                             norm_topk_prob=False, **overrides)
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # HF's unit norms, zero biases and zero Qwen router randomized, so each mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def ours_from(ref):
    cfg = hf.config_from_hf(ref.config.to_dict())
    model = build_model(cfg).eval()
    model.load_state_dict(hf.from_hf(ref.state_dict(), cfg))
    return cfg, model


def _ids(vocab: int, seq: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))


def _worst_logit_difference(ref, model, cfg) -> float:
    x = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected, got = ref(x).logits, model(x)[..., : cfg.vocab_size]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_converted_model_gives_hf_logits_and_tokens(kind):
    ref = reference(kind)
    cfg, ours = ours_from(ref)
    assert hf.hf_arch(cfg) == kind
    layers = [cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers)]
    if kind == "mixtral":
        assert layers == [True, True] and (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_size) == (4, 2, 48)
        assert cfg.moe.normalize_top_k and cfg.moe.aux_loss_coef == 0.02 and not cfg.qkv_bias and cfg.rope_theta == 1e6
    else:
        assert layers == [False, True] and cfg.ffn_size == 96
        assert (cfg.moe.expert_ffn_size, cfg.moe.shared_experts) == (32, 2)
        assert cfg.moe.shared_expert_gate and not cfg.moe.normalize_top_k and cfg.qkv_bias and not cfg.bias
    # the routing is not trivial: hidden states reach every expert of the last layer
    moe = ours.layers["1"].mlp
    with torch.no_grad():
        hidden = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
        assert set(moe.route(moe.router(hidden).float())[1].unique().tolist()) == set(range(4))
    print(f"{kind}: worst logit difference {_worst_logit_difference(ref, ours, cfg):.3g}")
    prompt = _ids(cfg.vocab_size, 5)
    with torch.no_grad():
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    got = ours.generate(prompt, 12)
    assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips_are_bit_exact(kind):
    ref = reference(kind)
    cfg, _ = ours_from(ref)
    # HF (fused, as transformers 5 modules hold experts) -> ours -> HF
    theirs = ref.state_dict()
    back = hf.to_hf(hf.from_hf(theirs, cfg), cfg)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    # ours (fresh weights of our own) -> HF, fused and per expert -> ours; the balancing bias comes back as zeros,
    # as do the vocabulary's padding rows (HF has no place for them)
    ours = build_model(cfg, seed=7).state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        ours[name][cfg.vocab_size:] = 0
    for fused in (True, False):
        hf_sd = hf.to_hf(ours, cfg, fused_experts=fused)
        assert any(".experts.gate_up_proj" in k for k in hf_sd) == fused
        again = hf.from_hf(hf_sd, cfg)
        assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    # the per-expert layout is the one save_pretrained writes
    per_expert = hf.to_hf(hf.from_hf(theirs, cfg), cfg, fused_experts=False)
    assert any(".w1." in k or ".experts.0.gate_proj." in k for k in per_expert)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips(kind):
    cfg = hf.config_from_hf(reference(kind).config.to_dict())
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    cfg.moe.z_loss_coef = 1e-3  # ours alone: travels as an extra key HF ignores
    assert hf.config_to_hf(cfg)["router_z_loss_coef"] == 1e-3
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("kind", KINDS)
def test_directories_convert_both_ways_through_the_tool(kind, tmp_path, capsys):
    """save_pretrained's directory -> our checkpoint (our logits) -> an HF directory holding the same tensors, which
    from_pretrained loads; and our checkpoint -> HF -> ours, bit-exact with the same config."""
    ref = reference(kind)
    ref.save_pretrained(tmp_path / "ref")
    rc, _, err = convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)
    assert rc == 0, err
    cfg, ours = load_ours(tmp_path / "ours")
    assert hf.hf_arch(cfg) == kind
    _worst_logit_difference(ref, ours, cfg)
    rc, _, err = convert("--input", tmp_path / "ours", "--to", "hf", "--output", tmp_path / "back",
                         "--max-shard-size", "100KB", capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    expected, back = hf_tensors(tmp_path / "ref"), hf_tensors(tmp_path / "back")
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(theirs) is type(ref)
    with torch.no_grad():
        assert torch.equal(theirs(_ids(cfg.vocab_size)).logits, ref(_ids(cfg.vocab_size)).logits)
    _, meta = round_trip_through_hf(tmp_path / "ours", tmp_path / "again", capsys)
    assert meta["imported_from"]["architectures"] == [type(ref).__name__]


def test_a_directory_of_fused_experts_imports_alike(tmp_path, capsys):
    """Experts stored as transformers 5 modules hold them (one gate_up_proj per layer) read as one per expert."""
    from safetensors.torch import save_file

    ref = reference("mixtral")
    ref.save_pretrained(tmp_path / "ref")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    for name in ("ref", "fused"):
        rc, _, err = convert("--from", "hf", tmp_path / name, "--output", tmp_path / f"ours-{name}", capsys=capsys)
        assert rc == 0, err
    a, b = hf_tensors(tmp_path / "ours-ref"), hf_tensors(tmp_path / "ours-fused")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_only_layers_is_refused_naming_the_key(tmp_path, capsys):
    ref = reference("qwen2_moe")
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\] is not supported"):
        hf.config_from_hf({**ref.config.to_dict(), "mlp_only_layers": [1]})
    ref.save_pretrained(tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    (tmp_path / "ref" / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [1]}))
    capsys.readouterr()  # save_pretrained's progress bar
    rc, _, err = convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)
    assert rc == 2 and "mlp_only_layers=[1]" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize(
    "kind, edit, named",
    [
        ("mixtral", {"router": "sigmoid"}, "model.moe.router=sigmoid has no HF equivalent"),
        ("mixtral", {"every": 2}, "model.moe.every=2 with model.moe.shared_experts=0 has no HF equivalent"),
        ("mixtral", {"normalize_top_k": False}, "model.moe.normalize_top_k=false has no HF equivalent"),
        ("qwen2_moe", {"shared_expert_gate": False}, "model.moe.shared_experts without model.moe.shared_expert_gate"),
    ],
)
def test_what_hf_cannot_express_is_refused(kind, edit, named):
    cfg = hf.config_from_hf(reference(kind).config.to_dict())
    for key, value in edit.items():
        setattr(cfg.moe, key, value)
    with pytest.raises(ValueError, match=named):
        hf.hf_arch(cfg)


def test_shared_expert_width_must_be_a_multiple_of_the_experts():
    config = reference("qwen2_moe").config.to_dict()
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=48 must be a positive multiple"):
        hf.config_from_hf({**config, "shared_expert_intermediate_size": 48})


def test_starting_from_hf_weights_refuses_other_routing(tmp_path):
    """checkpoint.init_from: a Mixtral directory whose experts have the run's shapes but route top-1 is refused,
    naming the key (the weights alone cannot tell)."""
    import dataclasses

    from megatron_lite.config import load_config
    from megatron_lite.convert.errors import ConvertError
    from megatron_lite.convert.init_from import _check_conventions

    run = load_config("configs/tiny-moe.yaml")
    there = dataclasses.replace(run.model, moe=dataclasses.replace(run.model.moe, top_k=1))
    with pytest.raises(ConvertError, match=r"moe\.top_k=1 there, 2 here"):
        _check_conventions(tmp_path, there, run)
    _check_conventions(tmp_path, run.model, run)  # the same routing passes
