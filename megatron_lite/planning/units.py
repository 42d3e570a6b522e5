"""Sizes as people write them and numbers as the planner's tables print them.

Memory sizes follow the usual split: ``80GB`` is decimal (80 x 10^9 bytes), ``80G`` and ``80GiB`` binary
(80 x 2^30 bytes); tables print GiB. Counts take a one-letter scale (``7B``, ``1.4T``, ``350M``).
"""

from __future__ import annotations

import re

from megatron_lite.planning.errors import PlanError

GiB = 1024**3
_BYTES = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": GiB, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": GiB, "tib": 1024**4}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_bytes(text: str) -> int:
    """'80GiB', '80G' (GiB), '80GB' (10^9), '1.5TiB' or a plain byte count; ``PlanError`` naming the text."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _BYTES:
        raise PlanError(f"not a memory size: '{text}' (e.g. 80GiB)")
    try:
        return int(float(m.group(1)) * _BYTES[m.group(2).lower()])
    except ValueError:
        raise PlanError(f"not a memory size: '{text}' (e.g. 80GiB)") from None


def parse_count(text: str) -> float:
    """'7e9', '7B', '1.4T', '350M'; ``PlanError`` naming the text."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]?)\s*", text)
    if not m or m.group(2).lower() not in _COUNT:
        raise PlanError(f"not a number: '{text}' (e.g. 7e9 or 7B)")
    try:
        return float(m.group(1)) * _COUNT[m.group(2).lower()]
    except ValueError:
        raise PlanError(f"not a number: '{text}'") from None


def gib(n: float | None) -> str:
    """Bytes as '12.34 GiB' ('-' for None)."""
    return "-" if n is None else f"{n / GiB:,.2f} GiB"


def human(x: float) -> str:
    """A count with a T, B, M or K suffix: '124.44M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


def duration(seconds: float) -> str:
    """Three significant digits in s, ms or us (whole seconds from 1000 s), so a 0.2 ms step does not print 0.000."""
    if seconds >= 1000:
        return f"{seconds:,.0f} s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{format(seconds / scale, '#.3g').rstrip('.')} {unit}"  # '#': 7.80, not 7.8
    raise AssertionError("unreachable")


def table(rows: list[tuple[str, str]]) -> str:
    """Two columns, the labels padded to the longest."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def seq_words(seq: int, target: int | None) -> str:
    """'seq 1024', or for an encoder-decoder 'input 512 + target 114'."""
    return f"seq {seq}" if target is None else f"input {seq} + target {target}"
