"""Issue 11: what a new user trips over in the first ten minutes and in everyday use.

Each test names the item of issue 11 it pins.  The CLI is run for real
(``python -m daemon``), configs and images are real files in tmp_path, and
the model is the tiny checkpoint; only a GPU running out of memory is faked.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.config import parse_config
from daemon.errors import BackendError, ConfigError
from tests.conftest import REPO, run_vlwatch, write_config


def png(path: Path, seed: int = 0, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


# ----------------------------------------------------------------- 11.5


@pytest.mark.parametrize("error", ["torch", "runtime"])
def test_out_of_memory_while_loading_says_so_with_numbers(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                          error: str) -> None:
    # issue 11.5: was "no attention implementation could be loaded (tried sdpa, eager)"
    import torch

    from daemon.backends.transformers import TransformersBackend
    from daemon.config import ModelConfig

    def no_room(*args: object, **kwargs: object) -> object:
        if error == "torch":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(TransformersBackend, "_instantiate", no_room)
    backend = TransformersBackend(ModelConfig(name=str(tiny_model), device="cpu", max_pixels=50000))
    with pytest.raises(BackendError) as info:
        backend.load()
    text = str(info.value)
    assert text.startswith(f"out of memory loading the model {tiny_model} on cpu"), text
    assert "attention" not in text
    from daemon.backends.oom import parameter_count

    params = parameter_count(tiny_model)
    assert params and f"({params / 1e9:.2f} B parameters in float32)" in text  # needed: from the checkpoint
    assert re.search(r"had [\d.]+ GiB free of [\d.]+ GiB", text)  # and what there was
    assert "model.max_pixels" in text and "model.backend: openai" in text
