"""Settings every test needs: one OpenMP thread (forked ranks hang otherwise), offline HF and wandb, DeepSpeed on
the CPU, and a per-session sample-index cache so tests never write into the user's cache."""

import os
import tempfile

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEGATRON_LITE_CACHE", tempfile.mkdtemp(prefix="megatron_lite_test_cache_"))

import torch  # noqa: E402

torch.set_num_threads(1)
