"""tools/convert_checkpoint.py and Hugging Face T5 (v1.1: gated GELU, untied head; the original: ReLU, tied and
scaled head): exported checkpoints load with AutoModelForSeq2SeqLM and give our logits and greedy outputs, round
trips are bit-exact both ways, --inspect reads both, checkpoint.init_from starts a run from an HF T5 directory, and
the original-Transformer style, which HF T5 cannot express, is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from megatron_lite.config import load_config
from megatron_lite.data import GlobalBatchLoader, IndexedDatasetWriter, build_datasets
from megatron_lite.data.seq2seq import target_prefix
from megatron_lite.parity import run_layout
from tests.convert.conftest import convert, hf_tensors, round_trip_through_hf

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
VOCAB = 384  # a multiple of pad_vocab_multiple: no padding rows, so every tensor round-trips; above the tokenizer's 300
START = 1  # the decoder starts with the tokenizer's pad token, as T5's does
# variant -> the overrides that make it from the v1.1 config below
VARIANTS = {
    "t5-v1.1": (),
    "t5-original": ("model.activation=relu", "model.tie_embeddings=true", "model.scale_decoder_output=true"),
}


@pytest.fixture(scope="module")
def t5_config(tmp_path_factory) -> str:
    """A ~70k-parameter T5 v1.1 (2 + 2 layers) on 200 reversal pairs of 3-20 tokens, ending in the tokenizer's eos 0,
    global batch 4 in microbatches of 2, 2 steps."""
    root = tmp_path_factory.mktemp("t5")
    prefix = str(root / "reverse")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16, vocab_size=VOCAB) as ws, \
            IndexedDatasetWriter(target_prefix(prefix), np.uint16, vocab_size=VOCAB) as wt:
        for _ in range(200):
            x = rng.integers(2, 300, int(rng.integers(3, 20)))
            ws.add_document(np.append(x, 0))
            wt.add_document(np.append(x[::-1], 0))
    path = root / "t5.yaml"
    path.write_text(
        "model:\n"
        f"  family: encoder_decoder\n  vocab_size: {VOCAB}\n  hidden_size: 32\n  num_layers: 2\n"
        "  num_decoder_layers: 2\n  num_heads: 4\n  kv_channels: 8\n  ffn_hidden_size: 64\n  max_seq_len: 64\n"
        "  position: relative\n  relative_attention_num_buckets: 8\n  relative_attention_max_distance: 32\n"
        "  norm: rmsnorm\n  norm_eps: 1.0e-6\n  activation: geglu\n  bias: false\n  tie_embeddings: false\n"
        "  scale_attn_logits: false\n  scale_decoder_output: false\n  init_std: 1.0\n"
        f"  decoder_start_token_id: {START}\n  embedding_dropout: 0.0\n  attention_dropout: 0.0\n"
        "  residual_dropout: 0.0\n"
        "data:\n"
        f"  prefixes: {prefix}\n  cache_dir: {root / 'index-cache'}\n  objective: seq2seq\n  seq_len: 20\n"
        "  target_seq_len: 20\n  split: 90,10,0\n  prefetch: 0\n"
        "training:\n  train_steps: 2\n  global_batch_size: 4\n  micro_batch_size: 2\n  eval_interval: 0\n"
        "  eval_samples: 4\n"
        "schedule:\n  kind: inverse_sqrt\n  warmup_steps: 1\n"
        "optimizer:\n  lr: 3.0e-3\n"
        "logging:\n  wandb_mode: disabled\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def trained(t5_config, tmp_path_factory):
    """variant -> the checkpoint at step 2 of a 2-step single-process run of it (random init, then trained)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"ckpt-{variant}")
            run_layout("single", t5_config, [*VARIANTS[variant], "checkpoint.interval=2"], timeout=300,
                       checkpoint_dir=root)
            cache[variant] = root / "step_00000002"
        return cache[variant]

    return get


def load_ours(ckpt):
    """Our encoder-decoder for a checkpoint (its config.yaml), weights read from its safetensors."""
    from megatron_lite.convert.checkpoint_io import read_config
    from megatron_lite.step.checkpoint_format import read_logical
    from megatron_lite.models.encoder_decoder import build_encoder_decoder

    cfg = read_config(ckpt).model
    model = build_encoder_decoder(cfg).eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    read_logical(state, ckpt)
    return cfg, model


def _source() -> tuple[torch.Tensor, torch.Tensor]:
    """Two source rows, the second right-padded."""
    ids = torch.randint(2, 300, (2, 18), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 18, dtype=torch.bool)
    padding[1, 11:] = False
    return ids, padding


def _hf_reference(variant: str, t5_config: str):
    """A T5ForConditionalGeneration HF initialized itself for the run's model section (v1.1's head untied)."""
    from megatron_lite.convert import t5

    cfg = load_config(t5_config, list(VARIANTS[variant])).model
    hf_cfg = {k: v for k, v in t5.config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg)).eval()
    if not cfg.tie_embeddings:
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.shared.weight) * 0.2)
    return ref


def _generate_hf(model, ids: torch.Tensor, padding: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=padding.long(), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, num_beams=1, eos_token_id=None)
    assert (out[:, 0] == START).all()  # HF's output starts with the decoder start token
    return out[:, 1:]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_t5_gives_our_logits_and_greedy_outputs(variant, trained, tokenizer, tmp_path, capsys):
    ckpt = trained(variant)
    rc, out, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", "--tokenizer", tokenizer,
                           capsys=capsys)
    assert rc == 0, err
    assert "peak RSS" in out
    cfg, ours = load_ours(ckpt)
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "T5ForConditionalGeneration"
    if cfg.tie_embeddings:  # the original T5: tied and scaled
        assert theirs.config.scale_decoder_outputs is True
        assert theirs.lm_head.weight.data_ptr() == theirs.shared.weight.data_ptr()
        assert "lm_head.weight" not in hf_tensors(tmp_path / "hf")
    else:  # v1.1: the head loads untied, as trained, and the decoder output is not rescaled
        assert theirs.config.scale_decoder_outputs is False
        assert theirs.lm_head.weight.data_ptr() != theirs.shared.weight.data_ptr()
        assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight)
        assert not torch.equal(theirs.lm_head.weight, theirs.shared.weight)
    ids, padding = _source()
    dec = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    dec[:, 0] = START
    with torch.no_grad():
        got = ours(ids, dec, padding_mask=padding)[..., :VOCAB]
        want = theirs(input_ids=ids, attention_mask=padding.long(), decoder_input_ids=dec).logits
    assert got.abs().max() > 1.0  # logits big enough for every convention to show at the tolerance
    assert (got - want).abs().max() < TOLERANCE
    generated = ours.generate(ids, 10, padding_mask=padding)
    assert torch.equal(generated, _generate_hf(theirs, ids, padding, 10))
    # special ids: eos and pad from the tokenizer (0, 1), no bos (T5 has none), the decoder start from the config
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"], hf_config["decoder_start_token_id"]) == (0, 1, START)
    assert "bos_token_id" not in hf_config
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("eos_token_id", "pad_token_id", "decoder_start_token_id")} == {
        "eos_token_id": 0, "pad_token_id": 1, "decoder_start_token_id": START}
    assert "bos_token_id" not in generation
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_to_hf_to_ours_is_bit_exact(variant, trained, tmp_path, capsys):
    config, meta = round_trip_through_hf(trained(variant), tmp_path, capsys)
    assert config["data"]["objective"] == "span_corruption"  # a valid encoder-decoder config; a run sets its own
    assert (meta["step"], meta["imported_from"]["architectures"]) == (0, ["T5ForConditionalGeneration"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_to_ours_to_hf_is_bit_exact_and_generates_alike(variant, t5_config, tmp_path, capsys):
    ref = _hf_reference(variant, t5_config)
    ref.save_pretrained(tmp_path / "ref")
    assert convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)[0] == 0
    rc, _, err = convert("--input", tmp_path / "ours", "--to", "hf", "--output", tmp_path / "back",
                         "--max-shard-size", "40KB", capsys=capsys)
    assert rc == 0, err
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1  # sharded, with the index
    expected, back = hf_tensors(tmp_path / "ref"), hf_tensors(tmp_path / "back")
    assert set(back) == set(expected)
    assert ("lm_head.weight" in expected) == (variant == "t5-v1.1")
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "back").eval()
    ids, padding = _source()
    with torch.no_grad():
        dec = torch.full((2, 1), START)
        assert torch.equal(theirs(input_ids=ids, attention_mask=padding.long(), decoder_input_ids=dec).logits,
                           ref(input_ids=ids, attention_mask=padding.long(), decoder_input_ids=dec).logits)
    _, ours = load_ours(tmp_path / "ours")  # the imported model generates what HF generates
    assert torch.equal(ours.generate(ids, 10, padding_mask=padding), _generate_hf(ref, ids, padding, 10))


def test_inspect_shows_a_t5_checkpoint_and_its_export(trained, tmp_path, capsys):
    ckpt = trained("t5-v1.1")
    rc, out, err = convert("--input", ckpt, "--inspect", capsys=capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"checkpoint {ckpt}"
    assert lines[1] == "  step 2, 8 samples consumed, saved from world_size=1 (pp=1 dp=1 tp=1)"
    assert "    family: encoder_decoder" in lines and "    position: relative" in lines
    row = next(line for line in lines if "model.layers.2.cross_attn.q_proj.weight" in line).split()
    assert row[1:4] == ["[32,", "32]", "float32"]
    assert any(line.startswith("    optim.encoder_pos_bias.weight.exp_avg ") for line in lines)
    assert lines[-1].startswith("  total: ") and "optimizer state" in lines[-1]
    assert convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)[0] == 0
    rc, out, _ = convert("--input", tmp_path / "hf", "--inspect", capsys=capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"Hugging Face model {tmp_path / 'hf'}: T5ForConditionalGeneration"
    assert any("decoder.block.1.layer.1.EncDecAttention.k.weight" in line for line in lines)


def _first_batch_loss_of_hf(ref, t5_config: str) -> float:
    """The HF model's token-mean loss on the run's first global batch (HF's own shift of the labels behind its
    decoder start token): what a run starting from its weights reports at step 1."""
    cfg = load_config(t5_config)
    data = build_datasets(cfg.data, {"train": cfg.global_batch_size}, log=lambda *_: None)["train"]
    batch = next(iter(GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, 0, 1,
                                        prefetch=0)))
    total = count = 0.0
    with torch.no_grad():
        for mb in batch:
            logits = ref(input_ids=mb["input_ids"], attention_mask=mb["padding_mask"].long(),
                         labels=mb["labels"]).logits
            total += F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="sum").item()
            count += int((mb["labels"] != -100).sum())
    return total / count


def test_init_from_an_hf_t5_directory(t5_config, tmp_path):
    ref = _hf_reference("t5-v1.1", t5_config)
    ref.save_pretrained(tmp_path / "hf")
    losses = run_layout("single", t5_config, [f"checkpoint.init_from={tmp_path / 'hf'}"], timeout=300,
                        checkpoint_dir=tmp_path / "ckpt").losses
    assert len(losses) == 2
    expected = _first_batch_loss_of_hf(ref, t5_config)
    assert abs(losses[0] - expected) < TOLERANCE, (losses, expected)
    fresh = run_layout("single", t5_config, timeout=300).losses
    assert abs(losses[0] - fresh[0]) > 1e-3  # the weights were HF's, not the run's own initial ones


def test_the_original_transformer_style_is_refused_in_one_line(trained, tmp_path, capsys):
    from megatron_lite.models.presets import get_preset

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained("t5-original"), ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    style = get_preset("transformer-base")
    for key in ("position", "norm", "norm_position", "bias", "scale_embeddings", "scale_decoder_output"):
        config["model"][key] = getattr(style, key)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    rc, _, err = convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "no HF T5 equivalent: " in err and "model.position='sinusoidal' (T5: 'relative')" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("edit, named", [
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu' is not supported; expected one of "
                                          "gated-gelu, relu"),
    ({"scale_decoder_outputs": False}, "the weights do not match config.json: it lacks lm_head.weight"),
])
def test_an_hf_t5_directory_that_does_not_fit_is_refused_in_one_line(edit, named, t5_config, tmp_path, capsys):
    ref = _hf_reference("t5-original", t5_config)  # tied: no lm_head.weight in the file
    ref.save_pretrained(tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    (tmp_path / "ref" / "config.json").write_text(json.dumps({**config, **edit}))
    capsys.readouterr()  # save_pretrained's own progress bar
    rc, _, err = convert("--from", "hf", tmp_path / "ref", "--output", tmp_path / "ours", capsys=capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert not (tmp_path / "ours").exists()
