"""checkpoint.init_from: a run starts from another checkpoint's weights (ours or an HF directory) with a new
optimizer, schedule and data position, the same on every engine; ``latest`` in the run directory still wins. And a
checkpoint saved under ZeRO-3 on 2 ranks converts to HF and resumes under FSDP on 1 rank."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.errors import CheckpointError
from megatron_lite.parity import run_layout
from tests.convert.conftest import GPT2_STYLE, convert, load_ours

TOLERANCE = 1e-5
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def source(saved_runs):
    """The checkpoint of step 2 of a 4-step single-process run: the weights later runs start from."""
    return saved_runs("single", (), 2)[1]


@pytest.fixture(scope="module")
def started(source, tiny_config, tmp_path_factory):
    """layout -> losses of a 4-step run under that layout started with checkpoint.init_from=source."""
    cache: dict[str, list[float]] = {}

    def get(layout: str, init_from=source) -> list[float]:
        key = f"{layout}:{init_from}"
        if key not in cache:
            root = tmp_path_factory.mktemp(f"init-{layout}")
            cache[key] = run_layout(layout, tiny_config, [f"checkpoint.init_from={init_from}"], timeout=300,
                                    checkpoint_dir=root / "ckpt").losses
        return cache[key]

    return get


def _first_batch_loss(ckpt, tiny_config) -> float:
    """The source model's token-mean loss on the first global batch: what a run starting from its weights reports
    at step 1 (the first step's loss is computed before the first update)."""
    from megatron_lite.data import GlobalBatchLoader, build_datasets
    from megatron_lite.step.tasks import causal_lm_task

    cfg = load_config(tiny_config)
    _, model = load_ours(ckpt)
    task = causal_lm_task(cfg)
    data = build_datasets(cfg.data, {"train": cfg.global_batch_size}, log=lambda *_: None)["train"]
    batch = next(iter(GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, 0, 1, 0,
                                        prefetch=0)))
    total = count = 0.0
    with torch.no_grad():
        for mb in batch:
            s, n = task.loss(model(**task.inputs(mb)), task.target(mb), training=True)
            total, count = total + float(s), count + float(n)
    return total / count


def test_a_run_starts_from_the_weights_only(started, source, saved_runs, tiny_config):
    losses = started("single")
    assert len(losses) == 4  # step 1 to 4: a new schedule and data position, not the source's step 2
    assert abs(losses[0] - _first_batch_loss(source, tiny_config)) < TOLERANCE
    fresh = saved_runs("single", (), 2)[0]
    assert abs(losses[0] - fresh[0]) > 1e-3  # the weights were not the initial ones


@pytest.mark.parametrize("layout", ["zero3", "fsdp2"])
def test_every_engine_starts_alike(started, layout):
    reference, got = started("single"), started(layout)
    assert max(abs(a - b) for a, b in zip(got, reference)) < TOLERANCE, (got, reference)


def test_an_hf_directory_starts_the_same_run(started, source, tmp_path_factory, capsys):
    hf_dir = tmp_path_factory.mktemp("init-hf") / "hf"
    assert convert("--input", source, "--to", "hf", "--output", hf_dir, capsys=capsys)[0] == 0
    reference, got = started("single"), started("single", init_from=hf_dir)
    assert max(abs(a - b) for a, b in zip(got, reference)) < TOLERANCE, (got, reference)


def test_latest_in_the_run_directory_wins(started, source, tiny_config, tmp_path):
    ckpt = tmp_path / "ckpt"
    init = [f"checkpoint.init_from={source}"]
    first = run_layout("single", tiny_config, [*init, "training.train_steps=2"], checkpoint_dir=ckpt).losses
    again = run_layout("single", tiny_config, init, checkpoint_dir=ckpt).losses  # resumes at step 2 of 4
    assert len(first) == 2 and len(again) == 2
    assert max(abs(a - b) for a, b in zip(first + again, started("single"))) < TOLERANCE
    meta = json.loads((ckpt / "step_00000004" / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"]) == (4, 32)
    assert not (ckpt / ".init_from").exists()


def test_weights_of_another_shape_are_refused(saved_runs, tiny_config, tmp_path):
    from megatron_lite.training.trainer import train

    _, gpt2 = saved_runs("single", tuple(GPT2_STYLE), 2)
    cfg = load_config(tiny_config, [f"checkpoint.init_from={gpt2}", f"logging.run_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"init_from=.*a checkpoint of another family or shape than the config"):
        train(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match="checkpoint.load and checkpoint.init_from are both set"):
        load_config(tiny_config, [f"checkpoint.init_from={gpt2}", f"checkpoint.load={gpt2}"])


def test_zero3_checkpoint_converts_to_hf_and_resumes_under_fsdp_on_one_rank(saved_runs, tiny_config, tmp_path,
                                                                            capsys):
    losses, ckpt = saved_runs("zero3", (), 2)
    assert json.loads((ckpt / "meta.json").read_text())["saved_layout"]["dp"] == 2
    assert convert("--input", ckpt, "--to", "hf", "--output", tmp_path / "hf", capsys=capsys)[0] == 0
    cfg, ours = load_ours(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[..., : cfg.vocab_size], theirs(ids).logits, rtol=0, atol=TOLERANCE)
    resumed = run_layout("fsdp1", tiny_config, [f"checkpoint.load={ckpt}"], timeout=300,
                         checkpoint_dir=tmp_path / "resumed").losses
    assert len(resumed) == 2
    assert max(abs(a - b) for a, b in zip(resumed, losses[2:])) < TOLERANCE, (resumed, losses)
