"""Where ``core.glm_decoder`` takes GLM-4V's decoder layers, and where it leaves transformers' ones (which the engine
then compiles). Its kernels and layers are checked under Triton's interpreter (tests/test_triton_kernels.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import glm_decoder, qkv_projection
from core.fused_layers import decoder_layers
from core.model_files import resolve
from core.model_loading import load
from helpers import tiny_glm


def _glm(*, int4: bool = True, stacked: bool = True):  # type: ignore[no-untyped-def]
    model = tiny_glm(int4=int4)
    if stacked:
        assert qkv_projection.install(model) == (2 if int4 else 0)
    return model


def test_only_where_its_kernels_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _glm()
    assert not glm_decoder.runs_here(torch.device("cpu"))
    assert glm_decoder.install(model) == 0  # the CPU, no interpreter: transformers' layers
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))
    pytest.importorskip("triton")
    assert glm_decoder.runs_here(torch.device("cuda"))


def test_not_for_other_layouts_or_models(monkeypatch, tiny_model: Path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (where they would run; install decides before any kernel)
    assert glm_decoder.install(_glm(stacked=False)) == 0  # the query, key and value apart
    assert glm_decoder.install(_glm(int4=False)) == 0  # full width: no stacked projection
    llava = load(resolve("x", tiny_model, allow_download=False), device="cpu", quantization="int4").model
    assert glm_decoder.install(llava) == 0  # not GLM-4V's layers


def test_agreement_is_measured_against_the_layers_change_not_its_output():
    generator = torch.Generator().manual_seed(0)
    given = 100 * torch.randn(80, 64, generator=generator)  # the residual: most of a real layer's output
    change = torch.randn(80, 64, generator=generator)
    theirs = given + change
    assert glm_decoder.close_enough(given, theirs, given + change * 1.005)  # (float32: its rounding is no help)
    wrong = given + change * 1.05  # 5 % off the change: under 1e-3 of the output
    assert (wrong - theirs).abs().max() < 1e-2 * theirs.abs().max()
    assert not glm_decoder.close_enough(given, theirs, wrong)
    assert not glm_decoder.close_enough(given, theirs, theirs[:40])
