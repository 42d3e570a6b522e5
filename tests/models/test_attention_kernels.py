"""Masked attention's two kernels agree: FlexAttention with a block mask (what CUDA runs) and SDPA with the dense mask
(what the CPU runs), for causal, document and padding masks, with grouped-query and multi-head attention.

FlexAttention has no CPU backward in torch 2.13, so only forwards are compared here; the GPU suite (tests/gpu/)
trains through it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_lite.models import layers
from megatron_lite.models.layers import Attention, BlockMask, attention_kernel, build_attention_mask, dense_mask

B, S = 2, 40


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():  # eager FlexAttention warns that it is not compiled; the CPU runs it eagerly
        warnings.simplefilter("ignore", UserWarning)
        yield


def _masks(kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(document_ids, padding_mask) [B, S] for one kind of mask."""
    docs = pad = None
    if kind in ("causal", "document", "document+padding"):
        docs = torch.zeros(B, S, dtype=torch.long)  # one document per row: causality alone
        if kind != "causal":
            docs[0, 10:] = 1
            docs[0, 31:] = 2
            docs[1, 17:] = 1
    if kind in ("padding", "document+padding", "left-padding"):
        pad = torch.ones(B, S, dtype=torch.bool)
        pad[0, 29:] = False
        pad[1, 35:] = False
        if kind == "left-padding":
            pad = pad.flip(-1)  # rows start with padding: queries that see no real key
    return docs, pad


def _real_queries(pad: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(B, S, dtype=torch.bool) if pad is None else pad


KINDS = ["causal", "document", "padding", "document+padding", "left-padding"]
CASES = [(kind, 4, 2) for kind in KINDS] + [(kind, 4, 4) for kind in KINDS] + [("document+padding", 4, 1)]


@pytest.mark.parametrize("kind, heads, kv_heads", CASES,
                         ids=[f"{k}-{'mha' if kv == h else 'mqa' if kv == 1 else 'gqa'}" for k, h, kv in CASES])
def test_flex_attention_forward_equals_sdpa_with_the_dense_mask(kind, heads, kv_heads):
    torch.manual_seed(0)
    attn = Attention(64, heads, kv_heads, 16, bias=False, dropout=0.0).eval()
    x = torch.randn(B, S, 64)
    docs, pad = _masks(kind)
    block = build_attention_mask(S, docs, pad, kernel="flex")
    dense = build_attention_mask(S, docs, pad, kernel="sdpa")
    assert isinstance(block, BlockMask) and dense.dtype == torch.bool
    with torch.no_grad():
        flex_out, sdpa_out = attn(x, mask=block, causal=True), attn(x, mask=dense, causal=True)
    real = _real_queries(pad)
    torch.testing.assert_close(flex_out[real], sdpa_out[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(flex_out).all()  # padded queries: junk, but finite
    # the rule behind the block mask is the dense mask's for every real query
    assert torch.equal(dense_mask(block)[real[:, None, :, None].expand(B, 1, S, S)],
                       dense[real[:, None, :, None].expand(B, 1, S, S)])


def test_block_masks_skip_the_blocks_nobody_attends_to():
    docs, _ = _masks("document")
    block = build_attention_mask(256, torch.zeros(B, 256, dtype=torch.long), kernel="flex")  # causal, 2 x 2 blocks
    visited = block.kv_num_blocks + block.full_kv_num_blocks  # partly and fully attended key blocks per query block
    assert visited[0, 0].tolist() == [1, 2]  # the first query block never reads the second key block
    assert build_attention_mask(S, docs, None, kernel="flex").shape == (B, 1, S, S)


def test_the_decoder_gives_the_same_logits_through_either_kernel(monkeypatch):
    """The whole decoder family with GQA, rotary positions and packed documents: only the mask's form differs."""
    from megatron_lite.config import load_config
    from megatron_lite.models import construct

    cfg = load_config(None, ["model.num_heads=4", "model.num_kv_heads=2"])
    torch.manual_seed(0)
    model = construct(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (B, S))
    docs, pad = _masks("document+padding")
    with torch.no_grad():
        monkeypatch.setattr(layers, "attention_kernel", lambda device: "sdpa")
        dense_logits = model(ids, document_ids=docs, padding_mask=pad)
        monkeypatch.setattr(layers, "attention_kernel", lambda device: "flex")
        flex_logits = model(ids, document_ids=docs, padding_mask=pad)
    torch.testing.assert_close(flex_logits[pad], dense_logits[pad], rtol=1e-5, atol=1e-5)


def test_what_flex_attention_does_not_take_runs_the_same_rule_densely():
    """Dropout (and a bias, or cached keys) send a block mask through SDPA as its dense form."""
    torch.manual_seed(0)
    attn = Attention(64, 4, 2, 16, bias=False, dropout=0.5).train()
    x = torch.randn(B, S, 64)
    docs, pad = _masks("document+padding")
    outs = []
    for kernel in ("flex", "sdpa"):
        torch.manual_seed(1)
        outs.append(attn(x, mask=build_attention_mask(S, docs, pad, kernel=kernel), causal=True))
    torch.testing.assert_close(outs[0][pad], outs[1][pad])
    outs[0].sum().backward()  # the dense path has a CPU backward


def test_the_kernel_each_device_uses():
    assert attention_kernel(torch.device("cuda", 0)) == "flex"
    assert attention_kernel(torch.device("cpu")) == "sdpa"
    assert isinstance(build_attention_mask(S, *_masks("padding")), torch.Tensor)  # "auto" on the CPU: dense
    with pytest.raises(ValueError, match="attention kernel 'xformers'"):
        build_attention_mask(S, *_masks("padding"), kernel="xformers")
