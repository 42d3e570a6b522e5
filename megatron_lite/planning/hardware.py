"""Peak dense FLOP/s and memory per accelerator, looked up by a substring of the device name.

Memory is what the device reports (``nvidia-smi --query-gpu=memory.total``, in MiB) where that is known, not the
marketing figure: an H200 sold as 141 GB reports 143771 MiB (140.4 GiB), an H100 "80GB" 81559 MiB (79.6 GiB).
Peak FLOP/s are the vendors' datasheet numbers for dense (not 2:4 sparse) tensor-core math, per device. They are the
MFU denominator: achievable matmul throughput is lower (an H100 SXM measures ~790 TFLOP/s in bf16 against 989 here).
Override or extend with ``register_device`` (or ``logging.peak_flops`` in the training config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Device:
    """One accelerator model: peak FLOP/s by dtype, memory in bytes, and a source for the numbers."""

    peak: dict[str, float]
    memory_bytes: int
    source: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


# Keys are matched case-insensitively as substrings of torch.cuda.get_device_name(); longer keys are tried first, so
# "H100 PCIe" wins over "H100". fp32 is the non-tensor-core rate; tf32 the tensor-core one.
DEVICES: dict[str, Device] = {
    "H200": Device({"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 66.9e12},
                   143771 * MiB, "NVIDIA H200 datasheet (SXM), dense; memory as nvidia-smi reports it (143771 MiB)"),
    "H100 PCIe": Device({"bf16": 756e12, "fp16": 756e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51.2e12},
                        80 * GiB, "NVIDIA H100 datasheet (PCIe), dense"),
    "H100": Device({"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 66.9e12},
                   81559 * MiB, "NVIDIA H100 datasheet (SXM), dense; memory as nvidia-smi reports it (81559 MiB)"),
    "GH200": Device({"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
                    96 * GiB, "NVIDIA GH200 datasheet, dense"),
    "B200": Device({"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "tf32": 1100e12, "fp32": 80e12},
                   180 * 10**9, "NVIDIA HGX B200 datasheet, dense (half the sparse figure)"),
    "A100": Device({"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
                   81920 * MiB, "NVIDIA A100 datasheet, dense; the 40GB model has the same peak; 80GB as "
                   "nvidia-smi reports it (81920 MiB)"),
    "A10G": Device({"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}, 24 * GiB, "AWS A10G, dense"),
    "A10": Device({"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}, 24 * GiB,
                  "NVIDIA A10 datasheet, dense"),
    "L40S": Device({"bf16": 362e12, "fp16": 362e12, "fp8": 733e12, "tf32": 183e12, "fp32": 91.6e12}, 48 * GiB,
                   "NVIDIA L40S datasheet, dense"),
    "L4": Device({"bf16": 121e12, "fp16": 121e12, "fp8": 242e12, "tf32": 60e12, "fp32": 30.3e12}, 24 * GiB,
                 "NVIDIA L4 datasheet, dense"),
    "V100": Device({"fp16": 125e12, "fp32": 15.7e12}, 32 * GiB, "NVIDIA V100 datasheet (SXM2); no bf16"),
    "MI300X": Device({"bf16": 1307.4e12, "fp16": 1307.4e12, "fp8": 2614.9e12, "tf32": 653.7e12, "fp32": 163.4e12},
                     192 * 10**9, "AMD Instinct MI300X datasheet, dense"),
    "MI250X": Device({"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12}, 128 * 10**9, "AMD Instinct MI250X datasheet"),
}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def register_device(key: str, peak: dict[str, float], memory_bytes: int, source: str = "user") -> None:
    """Add or replace a device (e.g. a new GPU, or a measured peak to use instead of the datasheet)."""
    DEVICES[key] = Device(dict(peak), int(memory_bytes), source)


def known_devices() -> list[str]:
    """The table's keys, for messages that list what ``--gpu`` accepts."""
    return sorted(DEVICES, key=str.lower)


def find_device(device_name: str) -> tuple[str, Device] | None:
    """The table entry whose key is the longest case-insensitive substring of ``device_name``."""
    name = device_name.lower()
    for key in sorted(DEVICES, key=len, reverse=True):
        if key.lower() in name:
            return key, DEVICES[key]
    return None


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one device for ``dtype``; None when the device or dtype is unknown (e.g. a CPU)."""
    found = find_device(device_name)
    if found is None:
        return None
    return found[1].peak.get(_DTYPE_ALIASES.get(dtype, dtype))


def device_memory(device_name: str) -> int | None:
    """Memory of one device in bytes, or None when unknown."""
    found = find_device(device_name)
    return None if found is None else found[1].memory_bytes
