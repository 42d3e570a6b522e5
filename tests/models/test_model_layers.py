"""Positions and masks in isolation."""

import math

import pytest
import torch

from megatron_lite.models.layers import (
    SinusoidalPositions,
    apply_rotary,
    build_attention_mask,
    rope_inv_freq,
    rotary_cos_sin,
)


@pytest.mark.parametrize("offset", [1, 7, 100])
def test_rotary_depends_only_on_relative_position(offset: int) -> None:
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(m: int, n: int) -> torch.Tensor:
        cos, sin = rotary_cos_sin(torch.tensor([[m, n]]), d, theta=10000.0)
        qm = apply_rotary(q, cos[:, :1], sin[:, :1])
        kn = apply_rotary(k, cos[:, 1:], sin[:, 1:])
        return (qm * kn).sum()

    for m, n in [(3, 1), (10, 4), (5, 5)]:
        torch.testing.assert_close(score(m, n), score(m + offset, n + offset), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotary_keeps_norm_and_identity_at_zero() -> None:
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rotary_cos_sin(torch.arange(5).expand(2, 5), 8, theta=500000.0)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(x, cos, sin)[:, :, 0], x[:, :, 0])


def test_llama3_rope_scaling_bands() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    base, scaled = rope_inv_freq(64, 500000.0), rope_inv_freq(64, 500000.0, scaling)
    wavelen = 2 * math.pi / base
    assert torch.equal(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high frequencies kept
    torch.testing.assert_close(scaled[wavelen > 8192], base[wavelen > 8192] / 8)  # low frequencies slowed
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        rope_inv_freq(64, 1e4, {"rope_type": "yarn"})


def test_sinusoidal_matches_the_transformer_formula() -> None:
    d = 6
    pe = SinusoidalPositions(d)(torch.tensor([[0, 1, 37]]))[0]
    for row, p in enumerate([0, 1, 37]):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert pe[row, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[row, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert SinusoidalPositions(5)(torch.tensor([[3]])).shape == (1, 1, 5)


def test_mask_is_none_for_pure_causal() -> None:
    assert build_attention_mask(4) is None


def test_mask_combines_causal_documents_and_padding() -> None:
    docs = torch.tensor([[0, 0, 1, 1]])
    pad = torch.tensor([[True, True, True, False]])
    m = build_attention_mask(4, docs, pad)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0],
         [1, 1, 0, 0],
         [0, 0, 1, 0],
         [0, 0, 1, 0]],  # last query is padding: it sees the real key of its document, never itself
        dtype=torch.bool,
    )  # fmt: skip
    assert torch.equal(m, expected)


def test_mask_guards_fully_masked_rows() -> None:
    pad = torch.tensor([[False, False, True, True]])  # left padding
    m = build_attention_mask(4, padding_mask=pad)[0, 0]
    assert m.any(-1).all()
    assert m[0, 0] and m[1, 1] and not m[1, 0]  # padded queries see only themselves
    assert not m[2:, :2].any()  # real queries never see padded keys
