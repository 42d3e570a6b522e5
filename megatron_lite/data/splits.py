"""Train/valid/test splits as contiguous document ranges, from a weight string such as ``"98,1,1"``."""

from __future__ import annotations

import numpy as np

from .errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str | list | tuple) -> list[float]:
    """Normalized weights for train, valid and test; missing trailing parts weigh 0."""
    parts = split if isinstance(split, (list, tuple)) else str(split).replace("/", ",").split(",")
    try:
        w = [float(x) for x in parts if str(x).strip() != ""]
    except ValueError:
        raise DataError(f"split '{split}': expected up to three numbers such as '98,1,1'") from None
    if not 1 <= len(w) <= 3 or any(x < 0 or not np.isfinite(x) for x in w) or sum(w) <= 0:
        raise DataError(f"split '{split}': expected one to three non-negative weights with a positive sum, "
                        f"such as '98,1,1'")
    w += [0.0] * (3 - len(w))
    total = sum(w)
    return [x / total for x in w]


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
