"""What one ``vlwatch bench`` setup measured: a row of the bench's table (engine-only and end-to-end alike)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SetupResult:
    setup: str
    batch: str
    images: int
    seconds: float
    images_per_min: float
    s_per_image: float
    ttft_s: float | None
    decode_tok_s: float | None
    peak_gpu_gib: float | None
    new_tokens: int | None  # None: not known (the end-to-end setup without --ignore-eos)
