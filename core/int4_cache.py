"""int4 weights kept on disk between starts, so a restart reads them instead of quantizing again.

Quantizing GLM-4.6V-Flash's 240 linears to int4 took 4.3-4.9 s of every start on the H200 (bench/RESULTS.md,
twenty-fourth step), most of it copying each full-width weight (18 GB in all) from host memory to the GPU.
The packed weights and their scales are a quarter of that: written once, under ``data_dir/int4-cache``, after
a start that quantized them, and read back by the next start of the same model files with the same settings.

One file per model (its location's hash names it), holding every quantized linear's ``packed`` and
``scales_zeros`` and, in its header, what they were made from: the model's weight files (names, sizes,
modification times), the modules left at full width, the device kind that quantized them and ``FORMAT``. A
file made from anything else, or unreadable, is a miss: the weights are quantized as on a first start and the
file is written again. It is written beside its place and renamed into it once complete, on a thread of its
own, so a start is never slowed by the disk and never reads half a file.
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
        self.device = torch.device(device)
        self.path = directory / f"{hashlib.sha256(str(files.resolve()).encode()).hexdigest()[:24]}.safetensors"
        made_from = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files.iterdir()
                           if p.is_file() and p.suffix in _SUFFIXES)
        self.key = json.dumps({"format": FORMAT, "device": torch.device(device).type, "dtype": str(dtype),
                               "skip": sorted(skip), "files": made_from}, sort_keys=True)

    def load(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Each cached linear's ``packed`` and ``scales_zeros`` by module name, on the device it was made for, where
        the file was made from this model as it is now; ``None`` otherwise (logged: why the weights are quantized
        again)."""
        if not self.path.is_file():
            return None
        try:
            with self.path.open("rb") as file:
                header, start = _header(file)
                if header.pop("__metadata__", {}).get("made_from") != self.key:
                    log.info("int4: the cached weights in %s were made from other files or settings; quantizing "
                             "again", self.path)
                    return None
                weights: dict[str, dict[str, torch.Tensor]] = {}
                for name, tensor in _read(file, header, start, self.device).items():
                    module, _, part = name.rpartition(".")
                    weights.setdefault(module, {})[part] = tensor
        except Exception as exc:  # truncated, or not a safetensors file at all
            log.warning("int4: cannot read the cached weights in %s (%s); quantizing again", self.path, exc)
            return None
        return weights

    def save(self, model: Any) -> threading.Thread:
        """Write every ``Int4Linear`` of ``model`` (copied to the CPU now) on a thread of its own; returns it."""
        from core.int4_weights import Int4Linear

        tensors = {f"{name}.{part}": getattr(module, part).detach().to("cpu", copy=True).contiguous()
                   for name, module in model.named_modules() if isinstance(module, Int4Linear)
                   for part in ("packed", "scales_zeros")}
        thread = threading.Thread(target=self._write, args=(tensors,), name="imsight-int4-cache", daemon=True)
        _writing.append(thread)
        thread.start()
        return thread

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


_DTYPES = {"I32": torch.int32, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}
_CHUNK = 64 * 2**20  # bytes through each of the two page-locked buffers at a time


def _header(file: Any) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (names to dtype, shape and byte range; ``__metadata__``) and where its data
    starts: an 8-byte little-endian length, then that much JSON."""
    length = int.from_bytes(file.read(8), "little")
    if not 0 < length < 2**27:
        raise ValueError(f"a header of {length} bytes")
    return json.loads(file.read(length)), 8 + length


def _read(file: Any, header: dict[str, Any], start: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the file, read straight into tensors of its own on ``device``. To a GPU through two
    page-locked buffers, each chunk's copy queued while the next chunk is read: safetensors' own reader copies
    each tensor from the file's mapping into pageable memory, then to the GPU (H200: 2.8 s for GLM-4.6V-Flash's
    4.3 GB, twenty-fourth step)."""
    staging = [torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)] \
        if device.type == "cuda" else []
    copied: list[torch.cuda.Event | None] = [None, None]
    turn = 0
    tensors = {}
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device=device)
        target = tensor.view(-1).view(torch.uint8)
        if target.numel() != end - begin:
            raise ValueError(f"{name}: {end - begin} bytes for {target.numel()}")
        file.seek(start + begin)
        if not staging:
            _read_into(file, target)
        for offset in range(0, target.numel(), _CHUNK) if staging else ():
            size = min(_CHUNK, target.numel() - offset)
            if (event := copied[turn]) is not None:
                event.synchronize()  # this buffer's last chunk is on the GPU
            _read_into(file, staging[turn][:size])
            target[offset:offset + size].copy_(staging[turn][:size], non_blocking=True)
            event = copied[turn] = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            turn = 1 - turn
        tensors[name] = tensor
    if staging:
        torch.cuda.current_stream().synchronize()
    return tensors


def _read_into(file: Any, target: torch.Tensor) -> None:
    """``target``'s bytes (uint8, on the CPU) from ``file``, all of them or an error."""
    view = memoryview(target.numpy())  # type: ignore[arg-type]  # (numpy's arrays are buffers)
    while len(view):
        count = file.readinto(view)
        if not count:
            raise ValueError("the file ends early")
        view = view[count:]
