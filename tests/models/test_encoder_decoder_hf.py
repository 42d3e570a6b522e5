"""Logit parity with Hugging Face T5ForConditionalGeneration (T5 v1.1 and the original T5) through convert/t5.py,
and the transformers-5 tied-head trap: an exported untied head must load untied and unscaled."""

import dataclasses
import json

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.convert import t5
from megatron_lite.models.encoder_decoder import build_encoder_decoder, shift_right

transformers = pytest.importorskip("transformers")

VOCAB = 300


def t5_config(v1_1: bool) -> ModelConfig:
    """A tiny T5: v1.1 (gated GELU, untied head, more decoder than encoder layers) or the original (ReLU, tied head,
    decoder output scaled)."""
    return ModelConfig(
        family="encoder_decoder", vocab_size=VOCAB, hidden_size=48, num_layers=2, num_decoder_layers=3 if v1_1 else 2,
        num_heads=3, kv_channels=8, ffn_hidden_size=64, max_seq_len=64, position="relative",
        relative_attention_num_buckets=8, relative_attention_max_distance=20, norm="rmsnorm", norm_eps=1e-6,
        norm_position="pre", activation="geglu" if v1_1 else "relu", bias=False, tie_embeddings=not v1_1,
        scale_attn_logits=False, scale_decoder_output=not v1_1,
    )  # fmt: skip


def ours(cfg: ModelConfig):
    model = build_encoder_decoder(cfg, seed=3).eval()
    with torch.no_grad():  # norm scales away from 1, so that a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 30), generator=g)
    padding = torch.ones(2, 30, dtype=torch.bool)
    padding[1, 19:] = False  # the second source is right-padded
    labels = torch.randint(2, VOCAB, (2, 25), generator=g)
    return ids, padding, labels


@pytest.mark.parametrize("v1_1", [True, False], ids=["t5-v1.1", "t5-original"])
def test_logits_match_hf_t5(tmp_path, v1_1: bool) -> None:
    cfg = t5_config(v1_1)
    model = ours(cfg)
    t5.save_hf(model.state_dict(), cfg, tmp_path)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, padding, labels = batch()
    dec = shift_right(labels, cfg.decoder_start_token_id)
    with torch.no_grad():
        got = model(ids, dec, padding_mask=padding)[..., :VOCAB]
        want = ref(input_ids=ids, attention_mask=padding.long(), decoder_input_ids=dec).logits
    assert got.abs().max() > 1.0  # logits big enough for every convention to show at the tolerance
    assert (got - want).abs().max() < 1e-5
    # the same logits through the HF loss path: labels in, HF shifts them itself with our start token
    with torch.no_grad():
        hf_loss = ref(input_ids=ids, attention_mask=padding.long(), labels=labels).loss
    ours_loss = torch.nn.functional.cross_entropy(got.reshape(-1, VOCAB), labels.reshape(-1))
    assert abs(hf_loss.item() - ours_loss.item()) < 1e-5


def test_untied_head_loads_untied_and_unscaled(tmp_path) -> None:
    cfg = t5_config(v1_1=True)
    model = ours(cfg)
    t5.save_hf(model.state_dict(), cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["tie_word_embeddings"] is False  # what keeps transformers 5 from scaling the decoder output
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert ref.config.scale_decoder_outputs is False
    assert ref.lm_head.weight.data_ptr() != ref.shared.weight.data_ptr()
    assert torch.equal(ref.lm_head.weight, model.lm_head.weight[:VOCAB])
    assert not torch.equal(ref.lm_head.weight, ref.shared.weight)


def test_tied_head_loads_tied_and_scaled(tmp_path) -> None:
    cfg = t5_config(v1_1=False)
    t5.save_hf(ours(cfg).state_dict(), cfg, tmp_path)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert ref.config.scale_decoder_outputs is True
    assert ref.lm_head.weight.data_ptr() == ref.shared.weight.data_ptr()


def test_round_trip_through_hf_files(tmp_path) -> None:
    cfg = t5_config(v1_1=True)
    model = ours(cfg)
    t5.save_hf(model.state_dict(), cfg, tmp_path)
    back_cfg, back = t5.load_hf(tmp_path)
    assert dataclasses.replace(back_cfg, max_seq_len=cfg.max_seq_len, init_std=cfg.init_std) == cfg
    mine = model.state_dict()
    assert set(back) == set(mine)
    for k, v in mine.items():  # the vocabulary padding rows come back as zeros
        rows = VOCAB if k in ("embed.weight", "lm_head.weight") else None
        assert torch.equal(back[k][:rows], v[:rows]), k
    assert not back["embed.weight"][VOCAB:].any()


def test_hf_initialized_model_converts_in(tmp_path) -> None:
    """The other direction: a model HF initialized and saved itself, read into ours, gives HF's logits."""
    cfg = t5_config(v1_1=True)
    hf_cfg = {k: v for k, v in t5.config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg)).eval()
    with torch.no_grad():
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.shared.weight) * 0.2)  # untie
    our_cfg = t5.config_from_hf(t5.config_to_hf(cfg))
    model = build_encoder_decoder(our_cfg, device="meta")
    model.load_state_dict(t5.from_hf(ref.state_dict(), our_cfg), assign=True)
    ids, padding, labels = batch()
    dec = shift_right(labels, 0)
    with torch.no_grad():
        got = model.eval()(ids, dec, padding_mask=padding)[..., :VOCAB]
        want = ref(input_ids=ids, attention_mask=padding.long(), decoder_input_ids=dec).logits
    assert (got - want).abs().max() < 1e-5


def test_greedy_generation_matches_hf(tmp_path) -> None:
    cfg = dataclasses.replace(t5_config(v1_1=True), num_decoder_layers=2)  # HF's cache needs equal stacks
    model = ours(cfg)
    t5.save_hf(model.state_dict(), cfg, tmp_path)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, padding, _ = batch()
    got = model.generate(ids, 12, padding_mask=padding)
    want = ref.generate(input_ids=ids, attention_mask=padding.long(), max_new_tokens=12, do_sample=False,
                        num_beams=1, eos_token_id=None, min_new_tokens=12)
    assert torch.equal(got, want[:, 1:])  # HF's output starts with the decoder start token
    assert len(set(got.flatten().tolist())) > 3  # not a degenerate repetition


def test_not_t5_is_refused() -> None:
    from megatron_lite.models.presets import get_preset

    with pytest.raises(ValueError, match=r"no HF T5 equivalent: .*position='sinusoidal'"):
        t5.config_to_hf(get_preset("transformer-base"))
