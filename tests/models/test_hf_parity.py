"""Logit parity with Hugging Face GPT-2 and Llama through convert/hf.py, and the reverse mapping."""

import dataclasses

import pytest
import torch

from megatron_lite.convert import hf
from megatron_lite.models import build_model

transformers = pytest.importorskip("transformers")


def gpt2_reference(tie: bool = True) -> "transformers.GPT2LMHeadModel":
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, initializer_range=0.15,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    # Large weights make every convention (GeLU variant, eps, rotary layout) visible at the 1e-5 tolerance, and HF's
    # zero biases and unit norms are randomized so the mapping of each is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def llama_reference(tie: bool = False, bias: bool = False, rope_scaling: dict | None = None
                    ) -> "transformers.LlamaForCausalLM":
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": 50000.0}
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_parameters=rope,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, initializer_range=0.15,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0, 0.1)
    return model


def ours_from(ref) -> tuple:
    cfg = hf.config_from_hf(ref.config.to_dict())
    model = build_model(cfg).eval()
    model.load_state_dict(hf.from_hf(ref.state_dict(), cfg))
    return cfg, model


def assert_same_logits(ref, model, cfg, seq_len: int = 20) -> None:
    x = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(x).logits
        got = model(x)
    assert got.shape[-1] == cfg.padded_vocab_size
    torch.testing.assert_close(got[..., : cfg.vocab_size], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_logit_parity(tie: bool) -> None:
    ref = gpt2_reference(tie)
    cfg, model = ours_from(ref)
    assert hf.hf_arch(cfg) == "gpt2" and cfg.activation == "gelu_tanh" and cfg.tie_embeddings == tie
    assert_same_logits(ref, model, cfg)


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_llama_logit_parity(tie: bool, bias: bool) -> None:
    ref = llama_reference(tie, bias)
    cfg, model = ours_from(ref)
    assert (cfg.kv_heads, cfg.position, cfg.rope_theta, cfg.tie_embeddings) == (2, "rotary", 50000.0, tie)
    assert_same_logits(ref, model, cfg)


def test_llama3_rope_scaling_logit_parity() -> None:
    """Llama 3.x long-context rotary (rope_type llama3) converts and gives HF's logits, past the original length."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    ref = llama_reference(rope_scaling=scaling)
    cfg, model = ours_from(ref)
    assert cfg.rope_scaling == scaling
    assert_same_logits(ref, model, cfg, seq_len=48)
    plain_cfg, plain = ours_from(llama_reference())
    x = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x), atol=1e-3)  # the scaling really changes the result
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("make", [gpt2_reference, llama_reference])
def test_reverse_mapping_round_trip(make) -> None:
    ref = make()
    cfg, model = ours_from(ref)
    back = hf.to_hf(model.state_dict(), cfg)
    expected = {k: v for k, v in ref.state_dict().items() if not k.endswith(".attn.bias")}
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    # Our weights loaded into a fresh HF model reproduce our logits.
    fresh = type(ref)(type(ref.config)(**hf.config_to_hf(cfg), bos_token_id=0, eos_token_id=0)).eval()
    fresh.load_state_dict(back)
    assert_same_logits(fresh, model, cfg)


def test_config_round_trip() -> None:
    for ref in (gpt2_reference(), llama_reference()):
        cfg = hf.config_from_hf(ref.config.to_dict())
        assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def test_unsupported_configs_are_refused() -> None:
    llama = llama_reference().config.to_dict()
    llama["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ValueError, match="rope scaling"):
        hf.config_from_hf(llama)
    llama["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}  # incomplete
    with pytest.raises(ValueError, match="low_freq_factor"):
        hf.config_from_hf(llama)
    with pytest.raises(ValueError, match="model_type"):
        hf.config_from_hf({"model_type": "t5"})
    cfg = hf.config_from_hf(gpt2_reference().config.to_dict())
    cfg.norm_position = "post"
    with pytest.raises(ValueError, match="no HF equivalent"):
        hf.hf_arch(cfg)


def test_unexpected_keys_are_reported() -> None:
    ref = gpt2_reference()
    cfg = hf.config_from_hf(ref.config.to_dict())
    sd = dict(ref.state_dict(), **{"transformer.h.9.attn.c_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys"):
        hf.from_hf(sd, cfg)


def test_converter_imports_no_training_stack() -> None:
    import subprocess
    import sys

    heavy = ("megatron_lite.training", "megatron_lite.engines", "megatron_lite.models", "transformers", "deepspeed")
    code = f"import sys, megatron_lite.convert.hf; sys.exit(str([m for m in sys.modules if m.startswith({heavy})]))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr.strip() == "[]"


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "llama-8b"])
def test_presets_give_hf_logits(preset: str) -> None:
    """Each preset's conventions (activation, eps, rotary theta and scaling, tying) match its HF class.

    GPT-2 124M runs at full size; the Llama shapes are shrunk (vocabulary, width, depth) with every other field kept,
    so the test stays small while the preset's conventions are what is compared.
    """
    from megatron_lite.models.presets import get_preset

    cfg = get_preset(preset)
    if preset.startswith("llama"):
        group = cfg.num_heads // cfg.kv_heads
        cfg = dataclasses.replace(cfg, vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2 * group,
                                  num_kv_heads=2, ffn_hidden_size=256)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so that eps and norm placement show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    hf_config = hf.config_to_hf(cfg)
    cls = transformers.GPT2LMHeadModel if hf.hf_arch(cfg) == "gpt2" else transformers.LlamaForCausalLM
    config_cls = transformers.GPT2Config if cls is transformers.GPT2LMHeadModel else transformers.LlamaConfig
    ref = cls(config_cls(**hf_config, bos_token_id=0, eos_token_id=0)).eval()
    ref.load_state_dict(hf.to_hf(model.state_dict(), cfg))
    assert_same_logits(ref, model, cfg, seq_len=24)
