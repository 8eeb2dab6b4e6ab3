"""Say what to do when the model does not fit while loading (issue 11.5).

torch's out-of-memory error is a ``RuntimeError``; the loader used to take it
for an attention implementation that would not load, try the next one and
end with "no attention implementation could be loaded (tried sdpa, eager)".
Here it is recognised and turned into a message with the numbers: what the
weights need (parameters, read from the safetensors headers, times the
dtype's size), what the device had free, and which settings help.

Deliberately not here: out of memory while *generating* (the worker splits
the batch and retries), and any attempt to load in less memory by itself.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from daemon.config import ModelConfig

GiB = 1 << 30

_OOM_TEXT = ("out of memory", "CUDA_ERROR_OUT_OF_MEMORY", "cudaErrorMemoryAllocation", "DefaultCPUAllocator: can't allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the allocator running out of memory."""
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ in ("OutOfMemoryError", "MemoryError"):
            return True
        if isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def parameter_count(source: str | os.PathLike[str]) -> int | None:
    """Parameters in the checkpoint at ``source``, from its safetensors headers (no weights are read)."""
    total = 0
    files = sorted(Path(source).glob("*.safetensors"))
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for d in entry.get("shape", ()):
                    count *= int(d)
                total += count
    return total or None


def free_memory(device: Any) -> tuple[int, int] | None:
    """(free, total) bytes of ``device``: the GPU's, or the machine's RAM for the CPU."""
    try:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            return torch.cuda.mem_get_info(device)
        pages, avail, size = (os.sysconf(k) for k in ("SC_PHYS_PAGES", "SC_AVPHYS_PAGES", "SC_PAGE_SIZE"))
        return avail * size, pages * size
    except Exception:  # whatever goes wrong here must not hide the message itself
        return None


def load_oom_message(name: str, source: str, dtype: Any, device: Any, config: ModelConfig) -> str:
    """What ran out, by how much, and what to set."""
    itemsize = getattr(dtype, "itemsize", None) or 2
    dtype_name = str(dtype).removeprefix("torch.")
    params = parameter_count(source)
    parts = [f"out of memory loading the model {name} on {device}"]
    need = params * itemsize if params else None
    if need:
        parts.append(f": its weights need about {need / GiB:.1f} GiB ({params / 1e9:.2f} B parameters in {dtype_name})")
    have = free_memory(device)
    if have:
        parts.append(f", and {device} had {have[0] / GiB:.1f} GiB free of {have[1] / GiB:.1f} GiB")
    advice = []
    if config.max_gpu_memory and need and config.max_gpu_memory < need * 1.15:
        advice.append(f"raise model.max_gpu_memory (now {config.max_gpu_memory / GiB:.1f} GiB; the weights alone "
                      f"need {need / GiB:.1f} GiB, and each image more)")
    if getattr(device, "type", "") == "cuda":
        advice.append("free the GPU (nvidia-smi shows who holds it) or pick another one (model.device: cuda:1)")
        if config.max_gpu_memory is None:
            advice.append("set model.max_gpu_memory (e.g. 22GiB) when sharing the GPU")
    else:
        advice.append("close other programs, or run on a GPU (model.device: cuda)")
    advice.append("lower model.max_pixels to need less for each image once loaded")
    advice.append("or serve the model elsewhere (model.backend: openai)")
    return "".join(parts) + ". To fix: " + "; ".join(advice) + "."
