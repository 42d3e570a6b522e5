"""Fixtures for the conversion tests: the engine tests' tiny corpus, config and cached saving runs, a small
byte-level BPE tokenizer, and helpers that call the tool in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.engines.conftest import REPO, corpus, saved_runs, tiny_config  # noqa: F401 -- fixtures reused

_spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)

GPT2_STYLE = ["model.position=learned", "model.norm=layernorm", "model.activation=gelu_tanh", "model.bias=true",
              "model.num_kv_heads=null", "model.max_seq_len=64"]
STYLES = {"llama": [], "gpt2": GPT2_STYLE}


def convert(*argv: str, capsys=None) -> tuple[int, str, str]:
    """Run tools/convert_checkpoint.py in this process (no progress bar); (exit status, stdout, stderr)."""
    rc = convert_checkpoint.run([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Path:
    """A 300-entry byte-level BPE with end-of-document and pad tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [torch.__doc__ or "", Path(torch.__file__).read_text()] * 4
    tok.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def load_ours(ckpt: Path):
    """Our model for a checkpoint (its config.yaml), weights read from its safetensors."""
    from megatron_lite.convert.checkpoint_io import read_config
    from megatron_lite.step.checkpoint_format import read_logical
    from megatron_lite.models import build_model

    cfg = read_config(ckpt).model
    model = build_model(cfg).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    read_logical(state, ckpt)
    return cfg, model


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def round_trip_through_hf(ckpt: Path, tmp_path: Path, capsys) -> tuple[dict, dict]:
    """Convert ``ckpt`` to HF and back; assert every ``model.*`` tensor came back bit-exact. Returns the imported
    checkpoint's config and meta."""
    import json

    import yaml

    assert convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)[0] == 0
    rc, _, err = convert("--from", "hf", tmp_path / "hf", "--output", tmp_path / "back", capsys=capsys)
    assert rc == 0, err
    original = {k: v for k, v in hf_tensors(ckpt).items() if k.startswith("model.")}
    back = hf_tensors(tmp_path / "back")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    config = yaml.safe_load((tmp_path / "back" / "config.yaml").read_text())
    assert config["model"] == yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
    return config, json.loads((tmp_path / "back" / "meta.json").read_text())
