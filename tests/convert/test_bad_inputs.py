"""Bad input to tools/convert_checkpoint.py: one line naming the file, tensor or option, exit status 2, no traceback,
and no output left behind; existing output is replaced only with --overwrite."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.convert.conftest import convert

transformers = pytest.importorskip("transformers")


def _one_line(rc: int, err: str, *named: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in named:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def llama(saved_runs):
    return saved_runs("single", (), 2)[1]


@pytest.fixture
def sharded_hf(llama, tmp_path, capsys):
    assert convert("--input", llama, "--to", "hf", "--output", tmp_path / "hf", "--max-shard-size", "1MB",
                   capsys=capsys)[0] == 0
    return tmp_path / "hf"


def test_a_missing_checkpoint(tmp_path, capsys):
    rc, _, err = convert("--input", tmp_path / "nope", "--inspect", capsys=capsys)
    _one_line(rc, err, str(tmp_path / "nope"), "no such checkpoint")


def test_a_shard_missing_from_a_sharded_hf_directory(sharded_hf, tmp_path, capsys):
    shards = sorted(sharded_hf.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    rc, _, err = convert("--from", "hf", sharded_hf, "--output", tmp_path / "ours", capsys=capsys)
    _one_line(rc, err, f"names {shards[1].name}, which is missing", "a shard of a sharded checkpoint is missing")
    assert not (tmp_path / "ours").exists()


def test_a_shard_missing_from_one_of_our_multi_rank_checkpoints(saved_runs, tmp_path, capsys):
    _, ckpt = saved_runs("fsdp2", (), 2)  # each rank wrote its half of every tensor
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    shards = sorted(copy.glob("shard-*.safetensors"))
    assert len(shards) == 2
    shards[1].unlink()
    rc, _, err = convert("--input", copy, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    _one_line(rc, err, "model.embed.weight has shape [256, 128], but the config gives [512, 128]",
              "per-rank shard files and holds shards 1: a shard of this checkpoint may be missing")
    shutil.copy(ckpt / shards[1].name, shards[1])  # the other half back, the first one away: a gap is found as such
    shards[0].unlink()
    rc, _, err = convert("--input", copy, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    _one_line(rc, err, "is incomplete", "a shard of this checkpoint is missing")


@pytest.mark.parametrize("edit, named", [
    ({"num_layers": 3}, "holds 9 tensors the config has no place for, e.g. model.layers.3.attn.k_proj.weight"),
    ({"hidden_size": 64, "ffn_hidden_size": 256}, "model.embed.weight has shape [512, 128], but the config gives "
                                                  "[512, 64]: a checkpoint of another family or shape"),
])
def test_a_checkpoint_of_another_shape_than_its_config(edit, named, llama, tmp_path, capsys):
    copy = tmp_path / "ckpt"
    shutil.copytree(llama, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"].update(edit)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    rc, _, err = convert("--input", copy, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    _one_line(rc, err, named)


def test_a_vocabulary_smaller_than_the_tokenizers(tokenizer, tmp_path, capsys):
    from tests.models.test_hf_parity import gpt2_reference

    gpt2_reference().save_pretrained(tmp_path / "ref")  # 101 tokens; the tokenizer has 300
    assert convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)[0] == 0
    rc, _, err = convert("--input", tmp_path / "ours", "--to", "hf", "--output", tmp_path / "hf", "--tokenizer",
                         tokenizer, capsys=capsys)
    _one_line(rc, err, "has ids up to 299", "model.vocab_size=101: the vocabulary is smaller than the tokenizer's")


def test_existing_output_needs_overwrite(llama, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    rc, _, err = convert("--input", llama, "--to", "hf", "--output", out, capsys=capsys)
    _one_line(rc, err, f"{out} already exists; pass --overwrite to replace it")
    assert (out / "old.txt").read_text() == "keep me"
    rc, _, err = convert("--input", llama, "--to", "hf", "--output", out, "--overwrite", capsys=capsys)
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or set-aside directory left


def test_an_unsupported_hf_architecture_is_named(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                               "model_type": "bert"}))
    rc, _, err = convert("--from", "hf", tmp_path / "bert", "--output", tmp_path / "ours", capsys=capsys)
    _one_line(rc, err, "architecture BertForMaskedLM is not supported", "GPT2LMHeadModel, LlamaForCausalLM")


def test_a_failure_midway_leaves_no_output(sharded_hf, tmp_path, capsys):
    last = sorted(sharded_hf.glob("model-*-of-*.safetensors"))[-1]
    with open(last, "r+b") as f:  # header intact, data cut short: found only when that tensor is read
        f.truncate(last.stat().st_size - 100)
    rc, _, err = convert("--from", "hf", sharded_hf, "--output", tmp_path / "ours", capsys=capsys)
    _one_line(rc, err, f"{last}: truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
