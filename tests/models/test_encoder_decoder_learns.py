"""A learning check: a tiny Transformer-base-shaped model (post-norm, sinusoidal, tied scaled embeddings), trained
through the real trainer with the original recipe (label smoothing 0.1, inverse-square-root schedule with warmup),
learns to reverse random token sequences, judged by exact match under KV-cached greedy ``generate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_lite.config import load_config
from megatron_lite.data import IndexedDatasetWriter
from megatron_lite.data.seq2seq import target_prefix
from megatron_lite.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
VOCAB, EOS, START, MAX_LEN = 24, 0, 1, 8  # ids 0-2 are special; 3..23 are the "words"


def reversal_pairs(prefix: str, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    with IndexedDatasetWriter(prefix, np.uint16, vocab_size=VOCAB) as ws, \
            IndexedDatasetWriter(target_prefix(prefix), np.uint16, vocab_size=VOCAB) as wt:
        for _ in range(n):
            x = rng.integers(3, VOCAB, int(rng.integers(3, MAX_LEN + 1)))
            pairs.append((x, np.append(x[::-1], EOS)))
            ws.add_document(x)
            wt.add_document(pairs[-1][1])
    return pairs


def test_transformer_learns_to_reverse(tmp_path) -> None:
    prefix = str(tmp_path / "reverse")
    reversal_pairs(prefix, 20000, seed=0)
    overrides = [
        "model.vocab_size=24", "model.pad_vocab_multiple=8", "model.hidden_size=64", "model.num_layers=2",
        "model.num_decoder_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128", "model.embedding_dropout=0.0",
        "model.residual_dropout=0.0", f"model.decoder_start_token_id={START}",
        f"data.prefixes={prefix}", "data.objective=seq2seq", f"data.seq_len={MAX_LEN}",
        f"data.target_seq_len={MAX_LEN + 1}", "data.split=1,0,0", f"data.cache_dir={tmp_path / 'cache'}",
        "training.train_steps=400", "training.global_batch_size=64", "training.micro_batch_size=64",
        "training.label_smoothing=0.1", "schedule.kind=inverse_sqrt", "schedule.warmup_steps=100",
        "optimizer.lr=2e-3", "optimizer.beta2=0.98", "optimizer.weight_decay=0.0",
        f"logging.run_dir={tmp_path / 'run'}", "logging.wandb_mode=disabled", "logging.log_interval=100",
        "checkpoint.interval=0", "checkpoint.resume=false",
    ]
    cfg = load_config(REPO / "configs" / "models" / "transformer-base.yaml", overrides)
    trainer = Trainer(cfg, log=lambda _: None)
    result = trainer.run()
    assert result.losses[-1] < 0.5 * result.losses[0]

    held_out = reversal_pairs(str(tmp_path / "held_out"), 200, seed=99)  # sequences the run never saw (mostly)
    src = torch.zeros(len(held_out), MAX_LEN, dtype=torch.long)
    padding = torch.zeros(len(held_out), MAX_LEN, dtype=torch.bool)
    for i, (x, _) in enumerate(held_out):
        src[i, : x.size], padding[i, : x.size] = torch.from_numpy(x.astype(np.int64)), True
    out = trainer.engine.module.generate(src, MAX_LEN + 1, padding_mask=padding, eos_token_id=EOS)
    exact = np.mean([out[i, : y.size].tolist() == y.tolist() for i, (_, y) in enumerate(held_out)])
    print(f"exact match {exact:.1%} after {result.final_step} steps; loss {result.losses[0]:.3f} -> "
          f"{result.losses[-1]:.3f}")
    assert exact > 0.9


def test_quickstart_t5_config_trains_with_span_corruption(tmp_path) -> None:
    """configs/quickstart-t5.yaml, shortened, on a small generated corpus: a tokenizer trained with sentinels, shards
    from preprocess_data.py, span corruption through the trainer, and a falling validation loss."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from preprocess_data import main as preprocess
    from train_tokenizer import main as train_tokenizer

    rng = np.random.default_rng(0)
    words = "the data model token sample shard index epoch split loader seed layer head norm span".split()
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(600):
            start = int(rng.integers(len(words)))  # word order follows a cycle, so spans can be predicted
            text = " ".join(words[(start + k) % len(words)] for k in range(int(rng.integers(20, 80))))
            f.write(json.dumps({"text": text}) + "\n")
    assert train_tokenizer(["--input", str(corpus), "--vocab-size", "400", "--sentinels", "40",
                            "--output", str(tmp_path / "tok")]) == 0
    prefix = tmp_path / "data" / "corpus"
    assert preprocess(["--input", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--output-prefix", str(prefix),
                       "--append-eod", "--workers", "1", "--no-progress"]) == 0
    cfg = load_config(REPO / "configs" / "quickstart-t5.yaml", [
        f"data.prefixes={prefix}", f"data.tokenizer={tmp_path / 'tok' / 'tokenizer.json'}", "model.vocab_size=400",
        "data.seq_len=64", "data.split=90,10,0", f"data.cache_dir={tmp_path / 'cache'}", "training.train_steps=40",
        "training.eval_interval=20", "training.eval_samples=16", f"logging.run_dir={tmp_path / 'run'}",
        "logging.wandb_mode=disabled", "checkpoint.interval=0",
    ])
    result = Trainer(cfg, log=lambda _: None).run()
    valid = [loss for _, loss in result.valid_losses]
    assert len(valid) == 3 and valid[-1] < 0.8 * valid[0], valid
