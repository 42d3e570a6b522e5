"""The encoder-decoder family: masks, shared relative bias, presets, KV-cached greedy generation for both families,
and the attention changes that must leave the decoder family as it was."""

import dataclasses

import pytest
import torch

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.models import build_model
from megatron_lite.models.encoder_decoder import EncoderDecoderLM, build_encoder_decoder, shift_right
from megatron_lite.models.layers import Attention
from megatron_lite.models.presets import get_preset

# Published totals of google/t5-v1_1-{small,base,large} (HF T5ForConditionalGeneration, untied head).
PUBLISHED = {"t5-v1_1-small": 76_961_152, "t5-v1_1-base": 247_577_856, "t5-v1_1-large": 783_150_080}


def tiny(style: str, **kw) -> ModelConfig:
    """A tiny model of ``style`` ("t5" or "transformer"), the shapes of the presets with small sizes."""
    base = get_preset("t5-v1_1-small" if style == "t5" else "transformer-base")
    small = dict(vocab_size=200, hidden_size=32, num_layers=2, num_decoder_layers=2, num_heads=4, ffn_hidden_size=64,
                 max_seq_len=64, embedding_dropout=0.0, residual_dropout=0.0)
    if style == "t5":
        small.update(kv_channels=8, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return dataclasses.replace(base, **{**small, **kw})


@pytest.mark.parametrize("name", PUBLISHED)
def test_t5_presets_have_published_counts(name: str) -> None:
    assert build_encoder_decoder(get_preset(name), device="meta").num_params() == PUBLISHED[name]


def test_transformer_base_shape() -> None:
    model = build_encoder_decoder(get_preset("transformer-base"), device="meta")
    assert len(model.encoder_blocks) == len(model.decoder_blocks) == 6
    assert model.lm_head.weight is model.embed.weight  # one vocabulary, one matrix
    assert model.layers["6"].mlp.up_proj.weight.shape == (2048, 512) and model.layers["6"].mlp.gate_proj is None
    assert model.final_norm is None and model.encoder_norm is None  # post-norm blocks end in their own norm


def test_shift_right_starts_with_the_start_token() -> None:
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert shift_right(labels, start_token_id=3, pad_token_id=0).tolist() == [[3, 5, 6, 7], [3, 8, 0, 0]]


@pytest.mark.parametrize("style", ["t5", "transformer"])
def test_masks(style: str) -> None:
    model = build_encoder_decoder(tiny(style), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 200, (1, 10), generator=g)
    dec = torch.randint(0, 200, (1, 8), generator=g)
    pad = torch.ones(1, 10, dtype=torch.bool)
    pad[0, 7:] = False
    with torch.no_grad():
        enc = model.encode(src)
        later = src.clone()
        later[0, -1] = (later[0, -1] + 1) % 200
        # the encoder is bidirectional: with no padding mask, a later token still changes the first position
        assert (model.encode(later)[0, 0] - enc[0, 0]).abs().max() > 1e-4
        # padded source tokens are invisible to the encoder's real tokens and to cross-attention
        out = model(src, dec, padding_mask=pad)
        other = src.clone()
        other[0, 7:] = 1
        assert torch.allclose(model(other, dec, padding_mask=pad), out, atol=1e-6)
        # the decoder is causal: a later decoder input leaves earlier logits alone
        dec2 = dec.clone()
        dec2[0, 5] = (dec2[0, 5] + 1) % 200
        out2 = model(src, dec2, padding_mask=pad)
        assert torch.allclose(out2[0, :5], out[0, :5], atol=1e-6) and not torch.allclose(out2[0, 5:], out[0, 5:])
        # a decoder padding mask changes nothing for real targets when the padding is on the right
        dpad = torch.ones(1, 8, dtype=torch.bool)
        dpad[0, 6:] = False
        assert torch.allclose(model(src, dec, pad, dpad)[0, :6], out[0, :6], atol=1e-6)


def test_relative_bias_is_one_table_per_stack() -> None:
    model = build_encoder_decoder(tiny("t5"), device="meta")
    tables = [n for n, _ in model.named_parameters() if "pos_bias" in n]
    assert tables == ["encoder_pos_bias.weight", "decoder_pos_bias.weight"]
    assert model.encoder_pos_bias.bidirectional and not model.decoder_pos_bias.bidirectional


def test_attention_is_causal_only_when_asked() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 2, 2, 8, bias=False, dropout=0.0).eval()
    x = torch.randn(1, 5, 16)
    full, causal = attn(x), attn(x, causal=True)
    assert torch.allclose(full[:, -1], causal[:, -1], atol=1e-6)  # the last query sees every key either way
    assert not torch.allclose(full[:, 0], causal[:, 0])
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.allclose(attn(x, mask=mask), causal, atol=1e-6)
    bias = torch.zeros(1, 2, 5, 5)  # a zero bias must not drop causality
    assert torch.allclose(attn(x, causal=True, bias=bias), causal, atol=1e-6)


def _greedy_without_cache(model: EncoderDecoderLM, src, pad, steps: int) -> torch.Tensor:
    memory = model.encode(src, pad)
    dec = src.new_full((src.shape[0], 1), model.cfg.decoder_start_token_id)
    for _ in range(steps):
        nxt = model.decode(dec, memory, pad)[:, -1, : model.cfg.vocab_size].argmax(-1, keepdim=True)
        dec = torch.cat((dec, nxt), 1)
    return dec[:, 1:]


@pytest.mark.parametrize("style", ["t5", "transformer"])
def test_encoder_decoder_generate_matches_uncached_greedy(style: str) -> None:
    # an untied head: a random tied one keeps predicting the token nearest the input, which tests little
    model = build_encoder_decoder(tiny(style, init_std=0.3, tie_embeddings=False), seed=2)
    src = torch.randint(0, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(3, 9, dtype=torch.bool)
    pad[2, 4:] = False
    with torch.no_grad():
        want = _greedy_without_cache(model.eval(), src, pad, 10)
    model.train()
    got = model.generate(src, 10, padding_mask=pad)
    assert model.training  # generate leaves the mode as it found it
    assert torch.equal(got, want) and len(set(got.flatten().tolist())) > 3


def test_generate_stops_at_eos() -> None:
    model = build_encoder_decoder(tiny("t5", init_std=0.3), seed=2)
    src = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    first = model.generate(src, 6)
    eos = int(first[0, 2])
    out = model.generate(src, 6, eos_token_id=eos)
    assert out[0, 2] == eos and (out[0, 2:] == eos).all()


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m"])
def test_decoder_generate_matches_uncached_greedy(preset: str) -> None:
    cfg = dataclasses.replace(get_preset(preset), vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                              ffn_hidden_size=128, init_std=0.2, max_seq_len=64)
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    ids = prompt
    with torch.no_grad():
        for _ in range(9):
            ids = torch.cat((ids, model(ids)[:, -1, :256].argmax(-1, keepdim=True)), 1)
    got = model.generate(prompt, 9)
    assert torch.equal(got, ids) and len(set(got[:, 7:].flatten().tolist())) > 2


def test_decoder_only_options_are_refused_for_decoders() -> None:
    with pytest.raises(ConfigError, match=r"model.kv_channels=64 is only supported with model.family=encoder_decoder"):
        ModelConfig(kv_channels=64).validate()
    with pytest.raises(ConfigError, match=r"model.position='relative' is only supported"):
        ModelConfig(position="relative").validate()
    with pytest.raises(ConfigError, match=r"model.position=rotary is not supported with model.family=encoder_decoder"):
        dataclasses.replace(tiny("t5"), position="rotary").validate()
    with pytest.raises(ValueError, match="is the decoder family"):
        build_model(tiny("t5"))


def test_family_and_objective_must_agree() -> None:
    from megatron_lite.config import Config, DataConfig, ParallelConfig

    encdec = dict(model=tiny("t5"), data=DataConfig(seq_len=32, objective="seq2seq"))
    Config(**encdec).validate()
    with pytest.raises(ConfigError, match="data.objective=causal_lm does not train model.family=encoder_decoder"):
        Config(model=tiny("t5"), data=DataConfig(seq_len=32)).validate()
    with pytest.raises(ConfigError, match="data.objective=span_corruption does not train model.family=decoder"):
        Config(data=DataConfig(objective="span_corruption")).validate()
    Config(**encdec, parallel=ParallelConfig(pp=2)).validate()  # pipeline stages split both stacks
