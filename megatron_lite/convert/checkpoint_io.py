"""Our logical checkpoints as conversion sees them: a config, tensors under ``model.`` / ``optim.`` names, and a meta.

What a config expects is read off its model built on the meta device (no memory), so a checkpoint of another family
or shape is refused before anything is converted, naming the first tensor that does not fit. Checkpoints written here
(imports) are weights-only unless optimizer moments come with them: step 0, no samples consumed, no RNG states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_lite.config import Config, ConfigError, ModelConfig, load_config
from megatron_lite.convert.errors import ConvertError
from megatron_lite.errors import CheckpointError
from megatron_lite.step.checkpoint_format import MODEL, find_latest, new_meta
from megatron_lite.step.checkpoint_format import read_meta as read_checkpoint_meta


def resolve_checkpoint(path: Path) -> Path:
    """A step directory, or a checkpoint root whose ``latest`` names one."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such checkpoint")
    if not (path / "meta.json").is_file():
        try:
            latest = find_latest(path)
        except FileNotFoundError as e:
            raise ConvertError(str(e)) from None
        if latest is None:
            raise ConvertError(f"{path}: not a checkpoint (no meta.json, and no 'latest' pointing to one)")
        path = latest
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (``step/checkpoint_format.py``), its errors as conversion errors."""
    try:
        return read_checkpoint_meta(ckpt)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None


def read_config(path: Path) -> Config:
    """The resolved config a checkpoint carries (``config.yaml``), or a config file given on the command line."""
    path = Path(path)
    file = path / "config.yaml" if path.is_dir() else path
    if not file.is_file():
        raise ConvertError(f"{file}: no such config file")
    try:
        return load_config(file)
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def expected_model_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``model.<name>`` -> a meta tensor for every tensor a checkpoint of ``cfg`` holds (tied ones under each name)."""
    from megatron_lite.models import construct

    try:
        with torch.device("meta"):
            model = construct(cfg)
    except (ConfigError, ValueError) as e:
        raise ConvertError(f"model config: {e}") from None
    return {MODEL + k: v for k, v in model.state_dict().items()}


def check_model_tensors(have: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str, note: str = "") -> None:
    """Refuse tensors that do not fit ``cfg``: missing, unexpected (another family or depth), or another shape.
    ``note`` is added to the message (what the source knows about its own completeness)."""
    want = {k: tuple(v.shape) for k, v in expected_model_tensors(cfg).items()}
    summary = (f"model.family={cfg.family}, hidden_size={cfg.hidden_size}, num_layers={cfg.num_layers}, "
               f"vocab_size={cfg.vocab_size} (padded {cfg.padded_vocab_size})")
    for key, shape in want.items():
        if key in have and tuple(have[key]) != shape:
            raise ConvertError(f"{where}: {key} has shape {list(have[key])}, but the config gives {list(shape)}: "
                               f"a checkpoint of another family or shape than the config says ({summary}){note}")
    missing = [k for k in want if k not in have]
    extra = sorted(k for k in have if k not in want)
    if missing or extra:
        what = [f"lacks {len(missing)} tensors the config needs, e.g. {missing[0]}"] if missing else []
        what += [f"holds {len(extra)} tensors the config has no place for, e.g. {extra[0]}"] if extra else []
        raise ConvertError(f"{where} {' and '.join(what)}: a checkpoint of another family or shape than the config "
                           f"says ({summary}){note}")


def write_meta(out: Path, config: Config, imported_from: dict[str, Any], step: int = 0, consumed: int = 0) -> None:
    """meta.json and config.yaml of an imported checkpoint (no RNG states: a run started from it seeds afresh)."""
    trainer_state = {"consumed_samples": consumed, "best_valid": None, "evals_without_improvement": 0}
    meta = new_meta(step, consumed, None, trainer_state, {}, imported_from=imported_from)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "config.yaml").write_text(config.to_yaml())
