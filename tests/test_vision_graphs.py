"""The vision blocks as one module that replays a CUDA graph per patch count (core/vision_graphs.py), on a
tiny GLM-4.1V-shaped model. On the CPU no graph can be made: what runs here is the tower's own output
through the module and which images would get a graph. The graphs themselves, and the engine making them
(a GLM engine needs the processor's torchvision, which the CPU's tests do not install), ran on the GPU
(bench/RESULTS.md, twenty-second step)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core import vision_attention
from core.vision_graphs import GraphedBlocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture
def glm() -> Any:
    from glm_model import tiny_glm

    model = tiny_glm()
    assert vision_attention.install(model)  # as the engine has it: the blocks hand over the boundaries
    return model


def _features(glm: Any, grids: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    grid = torch.tensor(grids)
    pixels = vision_attention.random_patches(glm.config.vision_config, grid, seed=seed)
    with torch.inference_mode():
        return glm.model.visual(pixels, grid_thw=grid).pooler_output.clone()


CASES = [[(1, 4, 6)], [(1, 4, 6), (1, 6, 8)], [(1, 8, 4)]]


def test_the_tower_gives_its_own_output_through_the_module(glm):
    visual = glm.model.visual
    own_blocks = visual.blocks
    before = [_features(glm, grids, seed) for seed, grids in enumerate(CASES)]
    graphed = GraphedBlocks.install(visual)
    assert graphed is not None and list(visual.blocks) == [graphed] and graphed.blocks is own_blocks
    assert GraphedBlocks.install(visual) is graphed  # once
    for enabled in (False, True):
        graphed.enabled = enabled
        for seed, (grids, own) in enumerate(zip(CASES, before, strict=True)):
            assert torch.equal(_features(glm, grids, seed), own), (enabled, grids)


def test_a_size_is_wanted_when_it_comes_back_and_several_images_together_never(glm):
    graphed = GraphedBlocks.install(glm.model.visual)
    assert graphed is not None
    for seed in range(2):
        _features(glm, [(1, 4, 6)], seed=seed)
    assert graphed.wanted == {}  # not enabled: nothing is kept
    graphed.enabled = True
    for seed in range(2):  # several images: their boundaries split them, no graph serves
        _features(glm, [(1, 4, 6), (1, 6, 8)], seed=seed)
    assert graphed.wanted == {}
    _features(glm, [(1, 4, 6)], seed=1)
    _features(glm, [(1, 8, 4)], seed=2)
    assert graphed.wanted == {}  # each size met once: a photo's odd size costs no capture
    _features(glm, [(1, 6, 4)], seed=3)  # as many patches as the first, another grid: the same graph serves it
    example = graphed.wanted[24]
    _features(glm, [(1, 4, 6)], seed=4)
    assert list(graphed.wanted) == [24] and graphed.wanted[24] is example  # the second image of the size is kept
    assert example.boundaries.tolist() == [0, 24] and example.hidden.shape[0] == 24
    assert example.cos.shape[0] == example.sin.shape[0] == 24
    _features(glm, [(1, 8, 4)], seed=5)
    assert list(graphed.wanted) == [24, 32]
    graphed.drop()
    assert graphed.wanted == {} and not graphed.enabled and graphed.patch_counts == []
