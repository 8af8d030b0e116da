"""Where and in what precision computations run: the one place that turns `--device` and `--dtype` into torch's terms.

Everything else creates its tensors on the device of the data they combine with (`device=x.device`), so a
model and transcoders moved here take every computation with them. Results are written as float32 on the
CPU whatever computed them. `tests/test_device_agnostic.py` holds ingest/ and queries/ to that.
"""

from __future__ import annotations

import torch

from circuit_catalog.errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# pullback candidate scoring: "auto" is bfloat16 on CUDA (tensor cores) and float32 elsewhere, where the bf16 path
# measured slower end to end on the development CPU (README, "On a GPU")
SCORE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when available, else the CPU; otherwise the named device, which must exist here."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(name)!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{device} requested but torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("mps requested but torch.backends.mps.is_available() is False")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {str(name)!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


# where an ingest's driver holds its copy of the model when Ray workers compute: it only tokenises, checks and hashes
DRIVER_DEVICE = "cpu"


def task_device(name: str | None, gpus: int) -> tuple[str, bool]:
    """(the device a Ray task loads the model on, whether the task takes a GPU) for `--device name` on a cluster with
    `gpus` GPUs: "auto" or "cuda[:N]" take a GPU each where there are any (the task sees its own alone, as "cuda");
    "auto" without GPUs is the CPU; anything else as named. "cuda" on a cluster without GPUs is refused."""
    wanted = "auto" if name is None else str(name)
    gpu_wanted = wanted == "auto" or wanted.startswith("cuda")
    if wanted.startswith("cuda") and not gpus:
        raise DeviceError(f"--device {wanted}: the Ray cluster has no GPUs")
    if gpus and gpu_wanted:
        return "cuda", True
    return ("cpu" if wanted == "auto" else wanted), False


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """"float32" (None), "bfloat16" or "float16" (or the torch dtype itself)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name a manifest records: "float32", "bfloat16", "float16"."""
    return str(dtype).removeprefix("torch.")


def score_dtype_for(name: str, device: torch.device) -> str:
    """The pullback score dtype `name` ("auto" or a dtype name) means on `device`, as the manifest records it."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name not in SCORE_DTYPES:
        raise DeviceError(f"unknown pullback score dtype {name!r}: expected one of {', '.join(SCORE_DTYPES)}")
    return name


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def matmul_dtype_for(name: str, device: torch.device) -> str:
    """What `--matmul-dtype` means on `device`: "auto" is bfloat16 where it is native, else float32."""
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in ("float32", "bfloat16"):
        raise DeviceError(f"unknown training matmul dtype {name!r}: expected auto, float32 or bfloat16")
    return name
