"""Behaviour of DecoderLM: masks, attention variants, weight tying, init, checkpointing and learning."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import ModelConfig, OptimizerConfig
from megatron_lite.models import DecoderLM, build_model
from megatron_lite.models.init import init_full_, to_empty_keeping_ties
from megatron_lite.parallel.wrappers import apply_activation_checkpointing
from megatron_lite.step.optim import no_decay_names

STYLES = {
    "gpt2": dict(position="learned", norm="layernorm", activation="gelu_tanh", bias=True),
    "llama": dict(position="rotary", norm="rmsnorm", activation="swiglu", bias=False, num_kv_heads=2),
    "transformer": dict(
        position="sinusoidal", norm="layernorm", norm_position="post", activation="relu", scale_embeddings=True
    ),
}


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=100, pad_vocab_multiple=32, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def model_for(seed: int = 0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    return build_model(small(**kw)).eval()


def ids(b: int = 2, s: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(seed))


def test_output_shape_is_padded_vocab() -> None:
    model = model_for()
    assert model.cfg.padded_vocab_size == 128
    assert model(ids()).shape == (2, 12, 128)


@pytest.mark.parametrize("style", STYLES)
def test_causality(style: str) -> None:
    model = model_for(**STYLES[style])
    x = ids()
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 100
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("style", STYLES)
def test_padding_mask_hides_padded_keys(style: str) -> None:
    model = model_for(**STYLES[style])
    x = ids(s=10)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, 6:] = False  # right padding
    pad[1, :3] = False  # left padding
    pos = (pad.long().cumsum(-1) - 1).clamp(min=0)
    out = model(x, position_ids=pos, padding_mask=pad)
    assert out.isfinite().all()
    y = x.clone()
    y[~pad] = (y[~pad] + 13) % 100  # change only the padded tokens
    torch.testing.assert_close(model(y, position_ids=pos, padding_mask=pad)[pad], out[pad])
    # Row 1 has real tokens 3..9: equal to running them alone.
    torch.testing.assert_close(out[1, 3:], model(x[1:, 3:])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_document_masking_equals_separate_documents(style: str) -> None:
    model = model_for(**STYLES[style])
    x = ids(b=1, s=12)
    lengths = [5, 4, 3]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(x, position_ids=pos, document_ids=doc_ids)
    alone = torch.cat([model(part) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_scale_embeddings_multiplies_token_embeddings_by_sqrt_hidden() -> None:
    """The original Transformer scales token embeddings by sqrt(d_model) before adding the (unscaled) positions."""
    plain = model_for(position="sinusoidal")
    scaled = model_for(position="sinusoidal", scale_embeddings=True)
    scaled.load_state_dict(plain.state_dict())
    seen = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        model.layers["0"].register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        model(ids())
    torch.testing.assert_close(seen["scaled"] - seen["plain"], plain.embed(ids()) * (math.sqrt(32) - 1))


def test_gqa_with_all_kv_heads_equals_mha() -> None:
    mha = model_for(position="rotary", num_kv_heads=None)
    gqa = model_for(position="rotary", num_kv_heads=4)
    gqa.load_state_dict(mha.state_dict())
    x = ids()
    torch.testing.assert_close(gqa(x), mha(x))


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa = model_for(position="rotary", num_kv_heads=2)
    mha = model_for(position="rotary", num_kv_heads=None)
    sd = gqa.state_dict()
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # [2 * d, h] -> [4 * d, h], each kv head twice
            sd[name] = sd[name].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
        if name.endswith(("k_proj.bias", "v_proj.bias")):
            sd[name] = sd[name].view(2, 8).repeat_interleave(2, dim=0).reshape(32)
    mha.load_state_dict(sd)
    x = ids()
    torch.testing.assert_close(gqa(x), mha(x))


def test_mqa_runs_and_learns() -> None:
    model = model_for(num_kv_heads=1)
    assert model.layers["0"].attn.k_proj.weight.shape == (8, 32)
    x = ids()
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert model.layers["0"].attn.k_proj.weight.grad.abs().sum() > 0


def test_tied_weights_share_storage_and_gradients() -> None:
    model = model_for(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    # The gradient holds contributions from both uses: input lookup rows and output projection.
    x = torch.tensor([[1, 2, 3]])
    model(x)[..., 0].sum().backward()
    grad = model.embed.weight.grad
    assert grad[0].abs().sum() > 0  # only the output use touches row 0 (never an input)
    assert grad[1].abs().sum() > 0
    untied = model_for(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() == model.num_params() + 128 * 32


def test_tying_survives_build_on_meta_then_materialize() -> None:
    meta = build_model(small(), device="meta")
    assert meta.embed.weight.is_meta and meta.lm_head.weight is meta.embed.weight
    untied = build_model(small(), device="meta")
    untied.to_empty(device="cpu")  # torch's own to_empty unties: the reason for to_empty_keeping_ties
    assert untied.lm_head.weight is not untied.embed.weight
    to_empty_keeping_ties(meta, "cpu")
    init_full_(meta, meta.init_rules(), seed=0)
    assert meta.lm_head.weight is meta.embed.weight and meta(ids()).isfinite().all()
    torch.testing.assert_close(meta.state_dict(), build_model(small(), seed=0).state_dict(), rtol=0, atol=0)


def test_init_stds() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, pad_vocab_multiple=1, hidden_size=256, num_layers=8, num_heads=4,
                      max_seq_len=32, init_std=0.02, bias=True)  # fmt: skip
    model = build_model(cfg)
    scaled = 0.02 / math.sqrt(2 * 8)
    block = model.layers["3"]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn_norm.bias == 0)
    assert torch.all(block.attn.q_proj.bias == 0)
    plain = build_model(dataclasses.replace(cfg, scaled_residual_init=False))
    assert plain.layers["3"].attn.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_activation_checkpointing_gives_identical_loss_and_grads(style: str) -> None:
    cfg = small(**STYLES[style], embedding_dropout=0.1, attention_dropout=0.1, residual_dropout=0.1)
    torch.manual_seed(0)
    ref = build_model(cfg).train()
    ckpt = apply_activation_checkpointing(build_model(cfg)).train()
    ckpt.load_state_dict(ref.state_dict())
    x = ids()
    losses = []
    for model in (ref, ckpt):
        torch.manual_seed(5)  # same dropout masks; recomputation must replay them
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_dropout_only_in_training() -> None:
    model = model_for(embedding_dropout=0.5, attention_dropout=0.5, residual_dropout=0.5)
    x = ids()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("style", STYLES)
def test_tiny_model_overfits_one_batch(style: str) -> None:
    torch.manual_seed(0)
    model = build_model(small(**STYLES[style])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x = ids(b=4, s=16)
    for _ in range(60):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_pipeline_style_stage_takes_hidden_states() -> None:
    """A stage without embed takes hidden states; one without final_norm/lm_head returns hidden states."""
    model = model_for(**STYLES["llama"])
    x = ids()
    full = model(x)
    first, last = model_for(**STYLES["llama"]), model_for(**STYLES["llama"])
    first.load_state_dict(model.state_dict())
    last.load_state_dict(model.state_dict())
    del first.layers["1"]
    first.final_norm = first.lm_head = None
    del last.layers["0"]
    last.embed = last.pos_embed = None
    assert [n for n, _ in last.named_parameters()][0].startswith("layers.1.")  # names keep the global index
    hidden = first(x)
    assert hidden.shape == (2, 12, 32)
    torch.testing.assert_close(last(hidden), full)


def test_num_params_and_no_decay_names() -> None:
    model = model_for(**STYLES["gpt2"])
    n_embed = 128 * 32 + 64 * 32
    assert model.num_params(exclude_embeddings=True) == model.num_params() - n_embed
    names = dict(model.named_parameters(remove_duplicate=False))
    no_decay = no_decay_names(model, OptimizerConfig())
    assert no_decay <= set(names)
    assert {"embed.weight", "pos_embed.weight", "lm_head.weight", "final_norm.weight", "final_norm.bias"} <= no_decay
    assert "layers.0.attn.q_proj.bias" in no_decay and "layers.0.attn.q_proj.weight" not in no_decay
    none = OptimizerConfig(no_decay_norms=False, no_decay_biases=False, no_decay_embeddings=False)
    assert no_decay_names(model, none) == set()
    only_norms = no_decay_names(model, OptimizerConfig(no_decay_biases=False, no_decay_embeddings=False))
    assert "layers.1.mlp_norm.weight" in only_norms
    assert "layers.1.mlp_norm.bias" not in only_norms and "layers.1.mlp.up_proj.bias" not in only_norms  # biases


def test_build_validates_config() -> None:
    from megatron_lite.config import ConfigError

    with pytest.raises(ConfigError):
        build_model(small(num_heads=5))
