"""Where a model's files are: a local directory, or the local Hugging Face cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelUnavailable

__all__ = ["ModelSource", "resolve"]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What to hand ``from_pretrained``, and whether it may reach the network."""

    name_or_path: str
    local_files_only: bool


def resolve(
    model: str, model_path: Path | None, *, allow_download: bool, cache_dir: Path | None = None
) -> ModelSource:
    """Find the model without touching the network; raise ``ModelUnavailable`` with a fix.

    ``HF_HUB_OFFLINE=1`` wins over ``allow_download``: an operator who said offline means it.
    """
    if model_path is not None:
        path = model_path.expanduser()
        # from_pretrained treats a missing directory as a hub id and fails obscurely: check first.
        if not path.is_dir():
            raise ModelUnavailable(f"[engine] model_path {str(path)!r} is not a directory. {_fixes(model)}")
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"[engine] model_path {str(path)!r} has no config.json: not a transformers model directory. "
                f"{_fixes(model)}"
            )
        return ModelSource(str(path), local_files_only=True)

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json", cache_dir=cache_dir), str):
        return ModelSource(model, local_files_only=True)
    offline = hub_offline()
    if allow_download and not offline:
        return ModelSource(model, local_files_only=False)
    where = str(cache_dir) if cache_dir else "the local Hugging Face cache"
    why = " (HF_HUB_OFFLINE is set, so it is not downloaded)" if allow_download and offline else ""
    raise ModelUnavailable(f"model {model!r} is not in {where}{why}. {_fixes(model)}")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network, read the way huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def unavailable(model: str, reason: str) -> ModelUnavailable:
    """The error for a load that failed although the files looked present."""
    return ModelUnavailable(f"cannot load model {model!r}: {reason}. {_fixes(model)}")


def _fixes(model: str) -> str:
    return (
        f"Fix: on a machine with internet run `imsight download-model {model} --local-dir DIR` (or "
        f"`hf download {model} --local-dir DIR`), copy DIR here and "
        "set [engine] model_path = \"DIR\"; or set [engine] allow_download = true on a connected host; "
        "or run `imsight demo` to see the daemon work with a tiny test model."
    )
