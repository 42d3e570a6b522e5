#!/usr/bin/env bash
# The GPU checks in one command, on one H100/H200: the pytest suite tests/gpu (tests marked gpu) and the speed
# benchmark against Hugging Face transformers. Run it from anywhere; --help lists the checks.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT=""
BENCH=1
DEEPSPEED_VERSION="0.19.8"

usage() {
  cat <<EOF
usage: tools/gpu_check.sh [--out DIR] [--no-bench] [--help]

Runs on one CUDA GPU (an H100 or H200 takes about 9 minutes in all; the durations below are estimates for that
card, not yet measured) and writes everything it prints under --out (default runs/gpu_check/<time>):

  preflight (10 s)        python, torch, CUDA and the GPU; pytest and DeepSpeed present (how to bring them below)
  tests/gpu/test_train_resume.py (~2.5 min)
      bf16 train 4 steps saving at step 2, then resume from it, under single, FSDP2 (fsdp1), ZeRO-1 and ZeRO-3
      (zero1-dp1, zero3-dp1): the resumed losses continue the uninterrupted sequence within 2e-3 (the first step
      after a load is where fused AdamW failed)
  tests/gpu/test_layouts.py (~1.5 min)
      2 steps of bf16 fsdp1, fsdp1-offload (FSDP2 CPUOffloadPolicy), zero1/2/3-dp1 against single through
      megatron_lite.parity.compare_layouts: losses within 3e-3, every tensor's gradient within 7.5e-2 of its norm
  tests/gpu/test_kernels.py (~2 min)
      the attention kernel actually used (profiler: flash, cuDNN, memory-efficient or FlexAttention, never SDPA's
      math kernel) for causal, document, padding and document+padding masks with GQA, and FlexAttention's outputs
      and gradients against dense-mask SDPA; torch.compile of blocks (causal, and FlexAttention under
      data.reset_at_document) against eager; fused AdamW on bf16 parameters after the state a load makes; the
      mixture layers' grouped expert matmuls (torch._grouped_mm, chosen by default on 9.0+) against their loop
  tests/gpu/test_memory.py (~2.5 min)
      peak memory (max_memory_allocated) of 5 bf16 configs (gpt2-124m fsdp1 and zero1, llama-1b fsdp1, with full
      recompute, and zero1) against tools/plan.py memory --overhead-gib 0; target within 10%; table in memory.md
  tests/gpu/test_two_gpus.py (skipped on one GPU; ~2 min on two)
      ZeRO-1 with TP 2 saves and resumes (its layout, and as one process); fp16 at TP 2 with an inf in one rank's
      shard: both ranks skip and back off together; a vanished peer under NCCL reported in one line
  bench (~1 min, --no-bench skips it)
      python tools/bench.py speed --device cuda --precision bf16: our step against transformers' for the same
      models (tokens/s, and MFU against the GPU's dense bf16 peak, which the table's header names)

Without a GPU the suite skips with one reason line (pytest -m gpu on a CPU machine shows it).

What the GPU machine lacks (it has no network): pytest and DeepSpeed (ZeRO checks skip without it). datasets and
wandb are not needed here (the trainer imports them only for Hugging Face datasets and wandb logging). On a machine
with network, for the GPU machine's Python version and platform (preflight prints them):

  pip download --dest wheels --only-binary=:all: --python-version <3.X> --platform manylinux2014_x86_64 \\
      --platform manylinux_2_28_x86_64 pytest iniconfig pluggy packaging pygments hjson msgpack ninja psutil \\
      py-cpuinfo pydantic pydantic-core annotated-types typing-extensions typing-inspection einops nvidia-ml-py
  pip wheel --no-deps --wheel-dir wheels "deepspeed==${DEEPSPEED_VERSION}"   # a source package; its CUDA ops
                                                                   # JIT-compile on the GPU machine with nvcc
  # copy wheels/ over, then on the GPU machine:
  ${PYTHON} -m pip install --no-index --find-links wheels pytest "deepspeed==${DEEPSPEED_VERSION}"
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-bench) BENCH=0; shift ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$REPO/runs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO" || exit 2

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_NVML_BASED_CUDA_CHECK=1   # device detection without a CUDA context: the checks fork their ranks
export DS_ACCELERATOR=cuda
export WANDB_MODE=disabled
export GPU_CHECK_DIR="$OUT"

log() { echo "$@" | tee -a "$OUT/summary.txt"; }

# ---------------------------------------------------------------------------------------------------------------------
# preflight
# ---------------------------------------------------------------------------------------------------------------------
log "== preflight ($(date '+%F %T'), writing to $OUT)"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import importlib.util, platform, sys
import torch
print(f"python {sys.version.split()[0]} ({platform.machine()}), torch {torch.__version__}, cuda {torch.version.cuda}")
if not torch.cuda.is_available():
    print("error: no CUDA device visible"); sys.exit(3)
print(f"gpu: {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
for name in ("pytest", "deepspeed", "transformers", "triton"):
    spec = importlib.util.find_spec(name)
    print(f"  {name}: {'present' if spec else 'MISSING'}")
EOF
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  log "error: preflight failed (exit $status): this needs a CUDA GPU and torch with CUDA"
  exit "$status"
fi
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
  log "error: pytest is missing; bring it as a wheel (tools/gpu_check.sh --help, last part)"
  exit 2
fi
if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  log "note: DeepSpeed is missing: the ZeRO checks will skip (tools/gpu_check.sh --help says how to bring it)"
fi

# ---------------------------------------------------------------------------------------------------------------------
# the pytest suite
# ---------------------------------------------------------------------------------------------------------------------
log "== tests/gpu (pytest -m gpu)"
start=$SECONDS
"$PYTHON" -m pytest tests/gpu -m gpu -q -s -rA --durations=0 -p no:cacheprovider --junitxml "$OUT/junit.xml" \
  2>&1 | tee "$OUT/pytest.log"
suite=${PIPESTATUS[0]}
log "tests/gpu: exit $suite after $((SECONDS - start)) s (log: $OUT/pytest.log)"

# ---------------------------------------------------------------------------------------------------------------------
# speed against transformers
# ---------------------------------------------------------------------------------------------------------------------
bench=0
if [ "$BENCH" -eq 1 ]; then
  log "== python tools/bench.py speed --device cuda --precision bf16"
  start=$SECONDS
  "$PYTHON" tools/bench.py speed --device cuda --precision bf16 2>&1 | tee "$OUT/bench_speed.txt"
  bench=${PIPESTATUS[0]}
  log "bench speed: exit $bench after $((SECONDS - start)) s (table: $OUT/bench_speed.txt)"
fi

log "== done: tests/gpu exit $suite, bench exit $bench; $OUT holds pytest.log, junit.xml, memory.md, bench_speed.txt"
[ "$suite" -eq 0 ] && [ "$bench" -eq 0 ]
