"""tools/convert_checkpoint.py and Hugging Face: exported models give our logits, round trips are bit-exact, an imported
model generates what HF generates, the tokenizer travels with the model, and what HF cannot express is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.convert.conftest import GPT2_STYLE, convert, hf_tensors, load_ours, round_trip_through_hf

transformers = pytest.importorskip("transformers")

# case -> (layout the checkpoint was trained under, overrides, HF class)
CASES = {
    "llama": ("single", (), "LlamaForCausalLM"),
    "gpt2-untied": ("single", (*GPT2_STYLE, "model.tie_embeddings=false"), "GPT2LMHeadModel"),
    "llama-tp2pp2": ("tp2pp2-1f1b", (), "LlamaForCausalLM"),
    "gpt2-bf16": ("single", (*GPT2_STYLE, "training.precision=bf16"), "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def trained(saved_runs):
    """case -> the checkpoint of step 2 of a 4-step run."""
    return lambda case: saved_runs(CASES[case][0], CASES[case][1], 2)[1]


def _ids(vocab: int, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_gives_our_logits(case, trained, tokenizer, tmp_path, capsys):
    ckpt = trained(case)
    if case == "llama-tp2pp2":
        assert json.loads((ckpt / "meta.json").read_text())["saved_layout"] == {"world_size": 4, "pp": 2, "dp": 1,
                                                                                 "tp": 2}
    rc, out, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", "--tokenizer", tokenizer,
                           capsys=capsys)
    assert rc == 0, err
    assert "peak RSS" in out
    cfg, ours = load_ours(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == CASES[case][2]
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[..., : cfg.vocab_size], theirs(ids).logits, rtol=0, atol=1e-5)
    # special ids from the tokenizer (not GPT-2's 50256), also in generation_config.json
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (0, 0, 1)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 1)
    if case == "gpt2-bf16":  # the same weights, written in bf16
        rc, _, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "bf16", "--dtype", "bfloat16",
                             capsys=capsys)
        assert rc == 0, err
        fp32, bf16 = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "bf16")
        assert set(fp32) == set(bf16)
        assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def test_tokenizer_files_load_in_transformers(trained, tokenizer, tmp_path, capsys):
    """The tokenizer named by the checkpoint's own config (data.tokenizer) travels with the model."""
    from megatron_lite.data.tokenizer import load_tokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained("llama"), ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["data"]["tokenizer"] = str(tmp_path / "gone.json")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    rc, _, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    gone = f"data.tokenizer={tmp_path / 'gone.json'}, which does not exist here; give it with --tokenizer"
    assert rc == 2 and gone in err, err
    config["data"]["tokenizer"] = str(tokenizer)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    rc, _, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    assert rc == 0, err
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tokenizer)
    text = "def forward(self, x):\n    return torch.relu(x)"
    assert theirs(text)["input_ids"] == ours.backend.encode(text).ids
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == (ours.eod_id, ours.pad_id, ours.eod_id)


@pytest.mark.parametrize("case", ["llama", "gpt2-untied"])
def test_ours_to_hf_to_ours_is_bit_exact(case, trained, tmp_path, capsys):
    _, meta = round_trip_through_hf(trained(case), tmp_path, capsys)
    assert (meta["step"], meta["consumed_samples"], meta["imported_from"]["kind"]) == (0, 0, "hf")


def _reference(kind: str):
    from tests.models.test_hf_parity import gpt2_reference, llama_reference

    return gpt2_reference(tie=False) if kind == "gpt2" else llama_reference(tie=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_to_ours_to_hf_is_bit_exact(kind, tmp_path, capsys):
    ref = _reference(kind)
    ref.save_pretrained(tmp_path / "ref")
    assert convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)[0] == 0
    rc, _, err = convert("--input", tmp_path / "ours", "--to", "hf", "--output", tmp_path / "back",
                         "--max-shard-size", "20KB", capsys=capsys)
    assert rc == 0, err
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1  # sharded, with the index
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    expected, back = hf_tensors(tmp_path / "ref"), hf_tensors(tmp_path / "back")
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = _ids(ref.config.vocab_size, 16)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref(ids).logits)


def _greedy(model, ids: torch.Tensor, new_tokens: int, vocab: int) -> torch.Tensor:
    """Greedy decoding with our forward: append the argmax over the real vocabulary, recompute, repeat."""
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(ids)[:, -1, :vocab]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_imported_model_generates_what_hf_generates(kind, tmp_path, capsys):
    ref = _reference(kind)
    ref.save_pretrained(tmp_path / "ref")
    assert convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)[0] == 0
    cfg, ours = load_ours(tmp_path / "ours")
    prompt = _ids(ref.config.vocab_size, 5)
    with torch.no_grad():
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    got = _greedy(ours, prompt, 12, cfg.vocab_size)
    assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize(
    "edit, named",
    [
        ({"scale_embeddings": True}, "model.scale_embeddings=true has no HF equivalent"),
        ({"residual_dropout": 0.1}, "model.residual_dropout=0.1 has no HF equivalent"),
        ({"norm_position": "post"}, "no HF equivalent: GPT-2 needs pre-norm"),
    ],
)
def test_what_hf_cannot_express_is_refused_in_one_line(edit, named, trained, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained("llama"), ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["model"].update(edit)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    rc, out, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    assert rc == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()


def test_inspect_shows_step_layout_samples_config_and_tensors(trained, tmp_path, capsys):
    ckpt = trained("llama-tp2pp2")
    rc, out, err = convert("--input", ckpt.parent, "--inspect", capsys=capsys)  # the root: 'latest' is followed
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"checkpoint {ckpt.parent / 'step_00000004'}"  # the run's last save
    assert lines[1] == "  step 4, 32 samples consumed, saved from world_size=4 (pp=2 dp=1 tp=2)"
    assert "    num_kv_heads: 2" in lines and "    position: rotary" in lines
    row = next(line for line in lines if "model.layers.0.attn.k_proj.weight" in line).split()
    assert row[1:4] == ["[64,", "128]", "float32"] and row[4] == f"{64 * 128 * 4:,}"
    assert any(line.startswith("    optim.layers.3.mlp.up_proj.weight.exp_avg_sq ") for line in lines)
    total = lines[-1]
    assert total.startswith("  total: ") and "optimizer state" in total
    # an HF directory too
    assert convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)[0] == 0
    rc, out, _ = convert("--input", tmp_path / "hf", "--inspect", capsys=capsys)
    assert rc == 0 and out.splitlines()[0] == f"Hugging Face model {tmp_path / 'hf'}: LlamaForCausalLM"
