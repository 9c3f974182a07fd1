"""The int4 weights a start quantized, kept under data_dir and read back by the next start of the same model
(``core.int4_cache``): the same weights and answers, and a miss (quantized again, written again) wherever the file
could be wrong."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from core import int4_cache
from core.int4_weights import Int4Linear, stored_fits
from core.model_files import resolve
from core.model_loading import load
from core.quantization import unquantised_modules


@pytest.fixture
def model_dir(tiny_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)  # (its files are touched below)
    return copy


def _load(model_dir: Path, cache: Path):  # type: ignore[no-untyped-def]
    loaded = load(resolve("x", model_dir, allow_download=False), device="cpu", quantization="int4", int4_cache=cache)
    int4_cache.wait()  # the file is written on a thread of its own
    return loaded.model


def _weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return {name: (m.packed, m.scales_zeros) for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def _answer(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return model.generate(input_ids=torch.tensor([[5, 9, 11, 3]]), max_new_tokens=8, do_sample=False)


def test_a_restart_reads_what_the_first_start_quantized(model_dir: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    cache = tmp_path / "int4-cache"
    first = _load(model_dir, cache)
    assert "quantized in" in caplog.text and "kept in" in caplog.text
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.partial"))
    caplog.clear()
    second = _load(model_dir, cache)
    assert "read from" in caplog.text and "kept in" not in caplog.text
    ours, theirs = _weights(second), _weights(first)
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(a, b) for name in ours for a, b in zip(ours[name], theirs[name], strict=True))
    assert torch.equal(_answer(second), _answer(first))


def test_other_files_or_a_broken_file_are_quantized_again(model_dir: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    cache = tmp_path / "int4-cache"
    reference = _answer(_load(model_dir, cache))
    (kept,) = cache.glob("*.safetensors")
    weights = next(model_dir.glob("*.safetensors"))
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))  # the model's files replaced (a newer download, say)
    caplog.clear()
    assert torch.equal(_answer(_load(model_dir, cache)), reference)
    assert "made from other files or settings" in caplog.text and "kept in" in caplog.text
    caplog.clear()
    _load(model_dir, cache)
    assert "read from" in caplog.text  # written again, for the files as they are now
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])  # a disk that filled up, say
    caplog.clear()
    assert torch.equal(_answer(_load(model_dir, cache)), reference)
    assert "cannot read the cached weights" in caplog.text and "kept in" in caplog.text
    caplog.clear()
    _load(model_dir, cache)
    assert "read from" in caplog.text


def test_stored_weights_must_fit_every_linear(model_dir: Path, tmp_path: Path) -> None:
    model = _load(model_dir, tmp_path / "int4-cache")
    stored = {name: {"packed": m.packed, "scales_zeros": m.scales_zeros}
              for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    plain = load(resolve("x", model_dir, allow_download=False), device="cpu", quantization="none").model
    skip = unquantised_modules(plain)
    assert stored_fits(plain, skip, stored)
    name = next(iter(stored))
    assert not stored_fits(plain, skip, {k: v for k, v in stored.items() if k != name})  # one missing
    wrong = dict(stored, **{name: {**stored[name], "packed": stored[name]["packed"][:-1]}})
    assert not stored_fits(plain, skip, wrong)  # one of another shape
    assert not stored_fits(plain, skip, dict(stored, extra=stored[name]))  # one the model does not have
