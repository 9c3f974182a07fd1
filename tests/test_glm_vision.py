"""Where ``core.glm_vision`` takes GLM-4V's vision blocks, and where it leaves transformers' ones (which the engine
then compiles). Its kernels and blocks are checked under Triton's interpreter (tests/test_triton_kernels.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from core import glm_vision, vision_attention
from core.model_files import resolve
from core.model_loading import load
from helpers import tiny_glm


def test_only_where_its_kernels_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_glm()
    assert vision_attention.install(model)
    assert glm_vision.install(model) == 0  # the CPU, no interpreter: transformers' blocks
    assert not any("forward" in vars(block) for block in model.model.visual.blocks)


def test_not_without_imsight_attention_or_for_other_models(monkeypatch, tiny_model: Path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (where they would run; install decides before any kernel)
    model = tiny_glm()
    assert glm_vision.install(model) == 0  # the tower's own attention (SDPA, split per image): not its blocks
    assert not any("forward" in vars(block) for block in model.model.visual.blocks)
    llava = load(resolve("x", tiny_model, allow_download=False), device="cpu", quantization="none").model
    assert vision_attention.install(llava) is False and glm_vision.install(llava) == 0  # not GLM-4V's tower


def test_not_for_other_activations(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_glm()
    assert vision_attention.install(model)
    for block in model.model.visual.blocks:
        block.mlp.act_fn = torch.nn.GELU()
    assert glm_vision.install(model) == 0
