"""Hugging Face model directories, both ways, streamed one conversion rule at a time.

Export writes what ``AutoModelForCausalLM.from_pretrained`` (decoders) or ``AutoModelForSeq2SeqLM.from_pretrained``
(T5) and ``AutoTokenizer.from_pretrained`` load, ready for fine-tuning: safetensors (sharded above
``max_shard_bytes``, with the HF index), ``config.json`` and ``generation_config.json`` whose special-token ids come
from the tokenizer (bos/eos/pad; T5: eos/pad, beside its ``decoder_start_token_id``), and the tokenizer files.
Import reads an HF directory of a supported architecture into a weights-only logical checkpoint (fp32, padded
vocabulary), which ``checkpoint.init_from`` starts a run from.

The mapping itself is the family's HF adapter (``HF_ADAPTERS``: ``convert/hf.py`` for decoders, ``convert/t5.py``
for encoder-decoders, each with ``conversion_rules``, ``config_to_hf``, ``config_from_hf``, ``hf_arch``,
``hf_key_prefix`` and ``is_ignored_hf_key``); this module only moves tensors through it.
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_lite.config import Config, ModelConfig
from megatron_lite.convert.checkpoint_io import MODEL, check_model_tensors, write_meta
from megatron_lite.convert.errors import ConvertError
from megatron_lite.convert.streaming import Entry, Progress, ShardedWriter, TensorDir
from megatron_lite.data.errors import DataError

DEFAULT_SHARD_BYTES = 5 * 2**30  # HF's own default for save_pretrained
# HF architectures each family's adapter reads (config.json "architectures" / "model_type"), and the family of each.
SUPPORTED = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral",
             "Qwen2MoeForCausalLM": "qwen2_moe", "T5ForConditionalGeneration": "t5"}
FAMILY_OF = {"gpt2": "decoder", "llama": "decoder", "mixtral": "decoder", "qwen2_moe": "decoder",
             "t5": "encoder_decoder"}
# generation_config.json: the ids config.json carries that generation reads
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_ADAPTERS = {"decoder": "megatron_lite.convert.hf", "encoder_decoder": "megatron_lite.convert.t5"}


def adapter(cfg: ModelConfig | str):
    """The HF adapter module of ``cfg``'s family, or of a family named."""
    from megatron_lite.models import model_class

    family = cfg if isinstance(cfg, str) else cfg.family
    model_class(family)  # an unknown family fails naming the known ones
    return importlib.import_module(HF_ADAPTERS[family])


@dataclass
class Converted:
    """What a conversion wrote: tensors, bytes, files."""

    tensors: int
    nbytes: int
    files: list[str]


def run_rules(rules: list, read: Callable[[str], torch.Tensor], meta: Callable[[str], torch.Tensor],
              out_dir: Path, rename: Callable[[str], str], dtype: Callable[[torch.dtype], torch.dtype],
              max_shard_bytes: int, progress: bool, desc: str, write_tied: bool) -> Converted:
    """Plan every output from meta tensors, then run the rules one at a time: read sources, convert, write, free.

    ``write_tied``: write the targets of tied rules too (our checkpoints hold a tied tensor under each name; HF
    files hold the embedding alone).
    """
    rules = [r for r in rules if write_tied or not r.tied]
    entries: list[Entry] = []
    for rule in rules:
        for name, t in zip(rule.targets, rule.fn(*(meta(s) for s in rule.sources))):
            entries.append(Entry(rename(name), tuple(t.shape), dtype(t.dtype)))
    writer = ShardedWriter(out_dir, entries, max_shard_bytes)
    bar = Progress(sum(e.nbytes for e in entries), len(entries), desc, enabled=progress)
    def convert_one(rule) -> None:  # a function, so that its tensors are freed on return, before the next is read
        for name, t in zip(rule.targets, rule.fn(*(read(s) for s in rule.sources))):
            writer.write(rename(name), t)
            bar.update(t.numel() * torch.empty((), dtype=dtype(t.dtype)).element_size())

    try:
        for rule in rules:
            convert_one(rule)
        writer.close()
    finally:
        bar.close()
    return Converted(len(entries), sum(e.nbytes for e in entries), writer.files)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def special_token_ids(tokenizer_path: str | Path, cfg: ModelConfig) -> tuple[dict[str, int], Any]:
    """bos/eos/pad ids from the tokenizer (bos: its ``bos_token`` when it names one, else end-of-document, as GPT-2
    does), and the loaded tokenizer; the vocabulary must hold every id the tokenizer can emit."""
    from megatron_lite.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_path)
    except DataError as e:
        raise ConvertError(str(e)) from None
    if tok.max_id >= cfg.vocab_size:
        raise ConvertError(f"tokenizer {tok.file} has ids up to {tok.max_id} ({tok.max_token!r}), but model.vocab_size="
                           f"{cfg.vocab_size}: the vocabulary is smaller than the tokenizer's")
    bos = tok.eod_id
    config_file = Path(tok.file).parent / "tokenizer_config.json"
    if config_file.is_file():
        name = json.loads(config_file.read_text()).get("bos_token")
        name = name.get("content") if isinstance(name, dict) else name
        found = tok.backend.token_to_id(name) if name else None
        bos = bos if found is None else found
    return {"bos_token_id": bos, "eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id}, tok


def write_tokenizer(out: Path, tok: Any, ids: dict[str, int], cfg: ModelConfig) -> None:
    """tokenizer.json plus the configs ``AutoTokenizer`` reads: the source's own where it has them, else a
    ``PreTrainedTokenizerFast`` config naming the special tokens."""
    src = Path(tok.file).parent
    shutil.copyfile(tok.file, out / "tokenizer.json")
    config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        config = json.loads((src / "tokenizer_config.json").read_text())
    names = {key.replace("_id", ""): tok.backend.id_to_token(i) for key, i in ids.items()}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", cfg.max_seq_len)
    for key, name in names.items():
        config.setdefault(key, name)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Ours -> HF
# ----------------------------------------------------------------------------------------------------------------------

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(ckpt: Path, out: Path, config: Config, tokenizer: str | Path | None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
              log: Callable[[str], None] = print) -> Converted:
    """Write our checkpoint ``ckpt`` (tensors only are read) as an HF model directory into ``out`` (which exists)."""
    cfg = config.model
    hf = adapter(cfg)
    if not hasattr(hf, "conversion_rules"):  # the streamed path needs the adapter's rules
        raise ConvertError(f"{ckpt}: model.family={cfg.family}: its HF adapter {hf.__name__} has no conversion rules, "
                           "which --to hf streams through")
    try:
        rules = hf.conversion_rules(cfg, to_hf=True)
    except ValueError as e:
        raise ConvertError(f"{ckpt}: {e}") from None
    source = TensorDir(ckpt)
    check_model_tensors({k: source.shape(k) for k in source.keys() if k.startswith(MODEL)}, cfg, str(ckpt),
                        source.shard_note())
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tok = None
    if tokenizer is not None:
        ids, tok = special_token_ids(tokenizer, cfg)
    else:
        log("warning: no tokenizer (none in the run's config, no --tokenizer): no tokenizer files written and the "
            "special token ids left unset")
    try:
        hf_config = hf.config_to_hf(cfg, special_tokens=ids)
    except ValueError as e:
        raise ConvertError(f"{ckpt}: {e}") from None
    source_dtype = source.dtype(MODEL + rules[0].sources[0])
    out_dtype = dtype or source_dtype
    hf_config["dtype"] = DTYPE_NAMES.get(out_dtype, str(out_dtype).replace("torch.", ""))
    done = run_rules(rules, lambda k: source.read(MODEL + k), lambda k: source.meta(MODEL + k), out,
                     rename=lambda k: k, dtype=lambda d: out_dtype if d.is_floating_point else d,
                     max_shard_bytes=max_shard_bytes, progress=progress, desc="to hf", write_tied=False)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = {k: hf_config[k] for k in GENERATION_KEYS if hf_config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **generation}, indent=2) + "\n")
    if tok is not None:  # the special tokens the family's config kept (T5 has no bos)
        write_tokenizer(out, tok, {k: v for k, v in ids.items() if hf_config.get(k) == v}, cfg)
    return done


# ----------------------------------------------------------------------------------------------------------------------
# HF -> ours
# ----------------------------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ConvertError(f"{file}: unreadable ({e})") from None
    archs = config.get("architectures") or []
    kinds = set(SUPPORTED.values())
    if not any(a in SUPPORTED for a in archs) and config.get("model_type") not in kinds:
        named = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
        raise ConvertError(f"{file}: architecture {named} is not supported; expected one of {', '.join(SUPPORTED)}")
    return config


def _kind(config: dict) -> str:
    """``gpt2``, ``llama``, ``mixtral``, ``qwen2_moe`` or ``t5``: the model_type, else the first supported
    architecture's."""
    if config.get("model_type") in FAMILY_OF:
        return config["model_type"]
    return next(SUPPORTED[a] for a in config.get("architectures") or [] if a in SUPPORTED)


def hf_model_config(hf_dir: Path) -> ModelConfig:
    """Our ModelConfig for an HF directory's config.json (its tokenizer's vocabulary must fit it)."""
    config = read_hf_config(hf_dir)
    try:
        return adapter(FAMILY_OF[_kind(config)]).config_from_hf(config)
    except ValueError as e:
        raise ConvertError(f"{Path(hf_dir) / 'config.json'}: {e}") from None


def hf_weight_rules(hf_dir: Path, cfg: ModelConfig, source: TensorDir) -> tuple[list, str]:
    """The HF -> ours rules for ``source``, and the prefix its stored names lack; every stored tensor must be used."""
    hf = adapter(cfg)
    arch = hf.hf_arch(cfg)
    prefix = hf.hf_key_prefix(source.keys(), arch)
    # mixtures of experts: stored one tensor per expert (as save_pretrained writes them) or fused per layer
    fused = {"fused_experts": True} if getattr(hf, "hf_fused_experts", lambda _: False)(source.keys()) else {}
    rules = hf.conversion_rules(cfg, to_hf=False, arch=arch, **fused)
    needed = {s for r in rules for s in r.sources}
    have = {prefix + k for k in source.keys() if not hf.is_ignored_hf_key(k, cfg)}
    missing, extra = sorted(needed - have), sorted(have - needed)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which {arch} with this config.json has not"
        raise ConvertError(f"{hf_dir}: the weights do not match config.json: it {what} "
                           f"({len(missing)} missing, {len(extra)} unexpected)")
    for r in rules:  # shapes: run the rules on meta tensors (a wrong vocabulary or width fails here)
        try:
            outs = r.fn(*(source.meta(s[len(prefix):]) for s in r.sources))
        except (ValueError, RuntimeError) as e:
            raise ConvertError(f"{hf_dir}: {', '.join(r.sources)} do not fit config.json ({e})") from None
        del outs
    return rules, prefix


def import_hf(hf_dir: Path, out: Path, progress: bool = True, base: Config | None = None) -> tuple[Config, Converted]:
    """Write the HF directory ``hf_dir`` as a weights-only logical checkpoint into ``out`` (which exists)."""
    cfg = hf_model_config(hf_dir)
    source = TensorDir(hf_dir)
    rules, prefix = hf_weight_rules(hf_dir, cfg, source)
    config = base or Config()
    config.model = cfg
    config.data.seq_len = min(config.data.seq_len, cfg.max_seq_len)  # a valid config: a run may set its own
    if cfg.family == "encoder_decoder" and config.data.objective == "causal_lm":
        config.data.objective = "span_corruption"  # T5's pretraining objective (a decoder's would not validate)
    if (Path(hf_dir) / "tokenizer.json").is_file():
        config.data.tokenizer = str(Path(hf_dir).resolve())
    done = run_rules(rules, lambda k: source.read(k[len(prefix):]), lambda k: source.meta(k[len(prefix):]), out,
                     rename=lambda k: MODEL + k, dtype=lambda d: torch.float32 if d.is_floating_point else d,
                     max_shard_bytes=DEFAULT_SHARD_BYTES, progress=progress, desc="from hf", write_tied=True)
    written = TensorDir(out)
    check_model_tensors({k: written.shape(k) for k in written.keys()}, cfg, str(hf_dir))
    write_meta(out, config, {"kind": "hf", "path": str(Path(hf_dir).resolve()),
                             "architectures": read_hf_config(hf_dir).get("architectures")})
    return config, done
