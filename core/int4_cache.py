"""int4 weights kept on disk between starts, so a restart reads them instead of quantizing again.

Quantizing GLM-4.6V-Flash's 240 linears to int4 took 4.3-7.7 s of every start on the H200 (bench/RESULTS.md,
twenty-fourth step), most of it copying each full-width weight (18 GB in all) from host memory to the GPU.
The packed weights and their scales are a quarter of that: written once, under ``data_dir/int4-cache``, after
a start that quantized them, and read back by the next start of the same model files with the same settings
(a restart's whole load 3.2 s against 5.0-6.0 before, on other hosts).

One file per model (its location's hash names it), holding every quantized linear's ``packed`` and
``scales_zeros`` and, in its header, what they were made from: the model's weight files (names, sizes,
modification times), the modules left at full width, the device kind that quantized them and ``FORMAT``. A
file made from anything else, or unreadable, is a miss: the weights are quantized as on a first start and the
file is written again. The weights are copied to host memory during the load (a CUDA call from another thread
would fail the graphs captured next: the first start's load ~3.5 s longer on the H200), then written beside the
file's place on a thread of its own and renamed into it once complete: a start never waits for the disk and never
reads half a file. safetensors reads and writes them (a reader of imsight's, through page-locked buffers, was no
faster on the H200).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "Int4Cache", "model_files", "wait"]

log = logging.getLogger(__name__)

# What ``int4_weights.quantize``/``pack`` write: bump it when they change, and every cached file is a miss.
FORMAT = 1
_SUFFIXES = (".safetensors", ".bin", ".json")
_writing: list[threading.Thread] = []  # files being written


def wait(timeout: float | None = None) -> None:
    """Until every file being written is written (or ``timeout`` has passed for each)."""
    for thread in list(_writing):
        thread.join(timeout)


def model_files(name_or_path: str, cache_dir: Path | None = None) -> Path | None:
    """The directory holding the model's files: the path itself, or the hub cache's snapshot of that id; ``None``
    where neither is on this machine."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache_dir)
    except Exception:  # an id the hub's cache cannot even look up
        return None
    return Path(config).parent if isinstance(config, str) else None


class Int4Cache:
    """The cached int4 weights of one model, made on one kind of device with some modules left at full width."""

    def __init__(self, directory: Path, files: Path, *, device: str, dtype: Any, skip: list[str]) -> None:
        self.path = directory / f"{hashlib.sha256(str(files.resolve()).encode()).hexdigest()[:24]}.safetensors"
        made_from = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files.iterdir()
                           if p.is_file() and p.suffix in _SUFFIXES)
        self.key = json.dumps({"format": FORMAT, "device": torch.device(device).type, "dtype": str(dtype),
                               "skip": sorted(skip), "files": made_from}, sort_keys=True)

    def load(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Each cached linear's ``packed`` and ``scales_zeros`` by module name (on the CPU), where the file was made
        from this model as it is now; ``None`` otherwise (logged: why the weights are quantized again)."""
        from safetensors import safe_open

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as stored:
                if (stored.metadata() or {}).get("made_from") != self.key:
                    log.info("int4: the cached weights in %s were made from other files or settings; quantizing "
                             "again", self.path)
                    return None
                weights: dict[str, dict[str, torch.Tensor]] = {}
                for name in stored.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    module, _, part = name.rpartition(".")
                    weights.setdefault(module, {})[part] = stored.get_tensor(name)
        except Exception as exc:  # truncated, or not a safetensors file at all
            log.warning("int4: cannot read the cached weights in %s (%s); quantizing again", self.path, exc)
            return None
        return weights

    def save(self, model: Any) -> None:
        """Write every ``Int4Linear`` of ``model`` (copied to the CPU now) on a thread of its own (``wait``)."""
        from core.int4_weights import Int4Linear

        tensors = {f"{name}.{part}": getattr(module, part).detach().to("cpu", copy=True).contiguous()
                   for name, module in model.named_modules() if isinstance(module, Int4Linear)
                   for part in ("packed", "scales_zeros")}
        thread = threading.Thread(target=self._write, args=(tensors,), name="imsight-int4-cache", daemon=True)
        _writing.append(thread)
        thread.start()

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self._write_file(tensors)
        finally:
            _writing.remove(threading.current_thread())

    def _write_file(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.path.parent.glob(f"{self.path.name}.*.partial"):  # a write that never finished
                stale.unlink(missing_ok=True)
            save_file(tensors, str(partial), metadata={"made_from": self.key})
            partial.replace(self.path)
        except OSError as exc:  # a full disk or a read-only data_dir: the next start quantizes again
            partial.unlink(missing_ok=True)
            log.warning("int4: cannot keep the quantized weights in %s (%s); the next start quantizes again",
                        self.path.parent, exc)
            return
        log.info("int4: quantized weights kept in %s (%.1f GB) for the next start", self.path,
                 self.path.stat().st_size / 1e9)
