"""T5 span corruption over packed token samples: random spans of the raw text become sentinels in the input, and the
target lists each sentinel followed by the tokens it hides.

For a raw window of ``T`` tokens, with noise density ``d`` (0.15) and mean span length ``m`` (3), as T5 computes them:

    noise   = round(d * T)          (at least 1, at most T - 1, as T5 clamps it when drawing spans)
    spans   = round(noise / m)      (at least 1)
    inputs  = T - noise + spans + 1 (kept tokens, one sentinel per span, end-of-document)
    targets = noise + spans + 1     (one sentinel before each span's tokens, end-of-document)

``T`` is the largest window whose inputs fit the requested encoder length: for 512 that is T = 568, with targets of
114. Every sample therefore has the same lengths and needs no padding.

Sample ``i`` cuts window ``i`` (``T`` tokens) from the packed stream of a :class:`GPTDataset` (or a blend of them)
and draws its spans from a generator seeded with ``(seed, i)``: a sample is a pure function of (data, seed, global
index), so runs resume exactly on any layout. Span boundaries follow T5: the noise tokens are cut into ``spans``
random non-empty runs and the kept tokens into as many, and the two alternate, kept tokens first.

Sentinels are the tokenizer's ``<extra_id_0>``, ``<extra_id_1>``, ... in order (``train_tokenizer.py --sentinels N``).
"""

from __future__ import annotations

import numpy as np

from .errors import DataError

NOISE_STREAM = 3  # keeps span draws apart from the document and sample shuffles, which use streams 0-2


def _counts(raw_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    noise = min(max(int(round(raw_length * noise_density)), 1), raw_length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, spans


def span_lengths(raw_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(encoder input length, target length) that a raw window of ``raw_length`` tokens corrupts into."""
    noise, spans = _counts(raw_length, noise_density, mean_span)
    return raw_length - noise + spans + 1, noise + spans + 1


def raw_length_for(inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> int:
    """The largest raw window whose corrupted input fits ``inputs_length`` tokens (568 for 512)."""
    if inputs_length < 3:
        raise DataError(f"span corruption needs an input length of at least 3 tokens, got {inputs_length}")
    raw = inputs_length
    while raw > 2 and span_lengths(raw, noise_density, mean_span)[0] > inputs_length:  # tiny lengths: a span's
        raw -= 1  # sentinel and the end token can outweigh the noise removed
    while span_lengths(raw + 1, noise_density, mean_span)[0] <= inputs_length:
        raw += 1
    return raw


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` random positive lengths (uniform over the ways to cut it)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.zeros(0, int)
    return np.diff(np.concatenate(([0], cuts, [total])))


def noise_mask(raw_length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [raw_length], True on the tokens that spans hide; kept and noise runs alternate, kept first."""
    noise, spans = _counts(raw_length, noise_density, mean_span)
    spans = min(spans, noise, raw_length - noise)  # each run must hold at least one token
    noise_runs = _segments(noise, spans, rng)
    kept_runs = _segments(raw_length - noise, spans, rng)
    runs = np.stack([kept_runs, noise_runs], axis=1).reshape(-1)
    flags = np.tile([False, True], spans)
    return np.repeat(flags, runs)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: list[int], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for ``tokens`` and a ``mask`` that starts with kept tokens (as :func:`noise_mask` draws it).

    Inputs: each span becomes its sentinel, in order. Targets: the same with the roles swapped, each run of kept
    tokens becomes a sentinel; since kept run ``k`` comes just before span ``k``, each sentinel precedes the span it
    stands for. Both end with ``eos_id``.
    """
    if mask.size and mask[0]:
        raise DataError("span corruption: the noise mask must start with a kept token")
    n_spans = int((mask & ~np.concatenate(([False], mask[:-1]))).sum())
    if n_spans > len(sentinels):
        raise DataError(f"a sample has {n_spans} spans but the tokenizer has {len(sentinels)} sentinels; train it "
                        f"with tools/train_tokenizer.py --sentinels {n_spans} (or more)")
    sentinel = np.asarray(sentinels[: max(n_spans, 1)], dtype=np.int64)

    def squeeze(hidden: np.ndarray) -> np.ndarray:
        first = hidden & ~np.concatenate(([False], hidden[:-1]))  # first token of each hidden run
        run = np.clip(np.cumsum(first) - 1, 0, sentinel.size - 1)
        out = np.where(first, sentinel[run], tokens)
        return np.concatenate((out[~hidden | first], [eos_id])).astype(np.int64)

    return squeeze(mask), squeeze(~mask)


class SpanCorruptionDataset:
    """``ds[i]`` is a dict with ``input_ids`` (``inputs_length``) and ``labels`` (the target length), int64.

    ``windows`` yields raw samples of ``raw_length_for(inputs_length)`` tokens: a :class:`GPTDataset` (or a blend)
    built with ``seq_len = raw_length - 1``, whose ``tokens`` hold ``seq_len + 1`` tokens.
    """

    def __init__(self, windows, inputs_length: int, sentinels: list[int], eos_id: int, seed: int,
                 noise_density: float = 0.15, mean_span: float = 3.0, name: str = "") -> None:
        if not 0.0 < noise_density < 1.0 or mean_span <= 0:
            raise DataError(f"noise density {noise_density} must be in (0, 1) and mean span {mean_span} positive")
        self.windows, self.seed, self.name = windows, int(seed), name
        self.noise_density, self.mean_span = noise_density, mean_span
        self.raw_length = raw_length_for(inputs_length, noise_density, mean_span)
        self.inputs_length, self.targets_length = span_lengths(self.raw_length, noise_density, mean_span)
        spans = _counts(self.raw_length, noise_density, mean_span)[1]
        if spans > len(sentinels):
            raise DataError(f"span corruption with inputs of {inputs_length} tokens makes {spans} spans, but the "
                            f"tokenizer has {len(sentinels)} sentinels; train it with tools/train_tokenizer.py "
                            f"--sentinels {spans} (or more)")
        self.sentinels, self.eos_id = list(sentinels), int(eos_id)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        tokens = np.asarray(self.windows[i]["tokens"], dtype=np.int64)
        if tokens.size != self.raw_length:
            raise DataError(f"{self.name}: window {i} holds {tokens.size} tokens, expected {self.raw_length}")
        rng = np.random.default_rng([self.seed, NOISE_STREAM, i])
        mask = noise_mask(self.raw_length, self.noise_density, self.mean_span, rng)
        inputs, targets = corrupt(tokens, mask, self.sentinels, self.eos_id)
        return {"input_ids": inputs, "labels": targets}
