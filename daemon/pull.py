"""``vlwatch pull``: the one command that touches the network.

Downloads a model repository into the standard local Hugging Face cache with
``huggingface_hub.snapshot_download``, which resumes interrupted downloads and
shows a progress bar; afterwards every other command finds it there with
``local_files_only``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from daemon.errors import VlwatchError, first_line

log = logging.getLogger(__name__)

#: Only what loading needs: weights, configs, tokenizer, processor, chat template.
ALLOW = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.py"]


def pull(name: str) -> Path:
    """Download model ``name`` (an id such as ``Qwen/Qwen2.5-VL-7B-Instruct``) and return its folder."""
    local = Path(name).expanduser()
    if local.is_dir():
        log.warning("%s is a local directory; nothing to download", local)
        return local
    from daemon.plan import canonical_name

    name = canonical_name(name)  # `vlwatch pull 3b` (issue 23)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise VlwatchError(f"huggingface_hub is not installed: {exc}") from exc
    print(f"downloading {name} into the local Hugging Face cache (resumable; run again to continue)")
    try:
        return Path(snapshot_download(name, allow_patterns=ALLOW))
    except RepositoryNotFoundError as exc:
        raise VlwatchError(f"no model {name!r} on the Hugging Face hub (or it needs a token: set HF_TOKEN)") from exc
    except LocalEntryNotFoundError as exc:
        raise VlwatchError(f"cannot reach the Hugging Face hub to download {name!r}: no network? ({first_line(exc)})") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise VlwatchError(f"download of {name!r} failed: {first_line(exc)}; run `vlwatch pull` again to resume") from exc
