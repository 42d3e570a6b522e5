"""Train/valid/test splits as contiguous document ranges, from a weight string such as ``"98,1,1"``."""

from __future__ import annotations

from megatron_lite.config import parse_split

from .errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


def split_ranges(split: str | list | tuple, num_documents: int, where: str = "") -> dict[str, tuple[int, int]]:
    """``{name: (first_doc, end_doc)}`` for each part with a positive weight; a part left empty is an error."""
    w = parse_split(split)
    bounds = [0]
    acc = 0.0
    for x in w:
        acc += x
        bounds.append(min(num_documents, int(round(acc * num_documents))))
    bounds[-1] = num_documents
    out = {}
    for name, x, a, b in zip(SPLIT_NAMES, w, bounds[:-1], bounds[1:]):
        if x == 0:
            continue
        if b <= a:
            raise DataError(f"{where}: split '{split}' leaves {name} empty ({num_documents} documents; "
                            f"give {name} a larger weight or use more data)")
        out[name] = (a, b)
    return out
