"""The vision encoder's attention without a host read in every block (core/vision_attention.py), on a tiny
GLM-4.1V-shaped model: the same output as transformers' SDPA way, and the images' lengths read once a run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core import vision_attention
from core.model_files import resolve
from core.model_loading import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture
def glm() -> Any:
    from glm_model import tiny_glm

    return tiny_glm()


def _features(glm: Any, grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    """The vision tower's output for random pixels of images of these grids."""
    grid = torch.tensor(grids)
    pixels = vision_attention.random_patches(glm.config.vision_config, grid, seed=seed)
    return glm.model.visual(pixels, grid_thw=grid).pooler_output.clone()


def _encode(glm: Any, grids: list[tuple[int, int, int]], seed: int) -> tuple[torch.Tensor, int]:
    """``_features``, and the host reads it made."""
    from vision_encoder import HostReads

    with torch.inference_mode(), HostReads() as reads:
        out = _features(glm, grids, seed)
    return out, reads.count


def test_images_encode_as_transformers_sdpa_way(glm):
    cases = [[(1, 4, 6)], [(1, 4, 6), (1, 6, 8)], [(1, 4, 4), (1, 8, 4), (1, 4, 6)]]
    before = [_encode(glm, grids, seed)[0] for seed, grids in enumerate(cases)]
    assert vision_attention.install(glm)
    assert glm.model.visual.config._attn_implementation == vision_attention.NAME
    assert glm.config.text_config._attn_implementation == "sdpa"  # the language model keeps its own
    for seed, (grids, own) in enumerate(zip(cases, before, strict=True)):
        assert torch.equal(own, _encode(glm, grids, seed)[0]), grids


def test_host_reads_do_not_grow_with_the_blocks():
    """The SDPA way reads the images' lengths in every block; this one once a run."""
    own, ours = {}, {}
    from glm_model import tiny_glm

    for depth in (2, 6):
        glm = tiny_glm(vision_depth=depth)
        own[depth] = _encode(glm, [(1, 4, 6), (1, 6, 8)], 0)[1]
        assert vision_attention.install(glm)
        ours[depth] = _encode(glm, [(1, 4, 6), (1, 6, 8)], 0)[1]
    assert own[6] > own[2]  # what is counted: a read a block, at least
    assert ours[6] == ours[2] < own[2]


def test_a_tower_it_cannot_check_keeps_its_own_attention(glm, tiny_model: Path):
    llava = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    assert not vision_attention.install(llava)  # no packed vision tower (CLIP)
    glm.model.visual.config._attn_implementation = "eager"
    assert not vision_attention.install(glm)
    assert glm.model.visual.config._attn_implementation == "eager"


def test_a_tower_that_disagrees_keeps_its_own_attention(glm, monkeypatch):
    def wrong(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out, _ = original(module, query, *args, **kwargs)
        return out * 1.001, None

    from transformers import AttentionInterface

    original = vision_attention.packed_sdpa
    monkeypatch.setattr(vision_attention, "packed_sdpa", wrong)
    try:
        assert not vision_attention.install(glm)
    finally:
        AttentionInterface.register(vision_attention.NAME, original)  # install registered the wrong one
    assert glm.model.visual.config._attn_implementation == "sdpa"


def test_compiled_blocks_encode_as_the_eager_ones(glm):
    """Compiled on one image (``core/compiled_vision.py``), the blocks encode several images and images of other
    sizes as the eager ones do, without compiling again; where they fail, eagerly from then on."""
    from torch._dynamo.utils import counters

    from core.compiled_vision import CompiledVision

    vision = CompiledVision()
    assert not vision.compile(glm, lambda: None)  # the tower's own attention: splits in every block
    assert vision_attention.install(glm)

    runs: list[bool] = []  # whether each run's first block ran compiled
    graphs_after: list[int] = []

    def dummies() -> None:
        for grids in ([(1, 4, 6)], [(1, 4, 6), (1, 6, 4)]):
            _features(glm, grids, 0)
            graphs_after.append(counters["stats"]["unique_graphs"])

    with torch.inference_mode():
        assert vision.compile(glm, dummies)
        assert vision.compiled
        assert graphs_after[0] == graphs_after[1]  # several images take one image's graphs
        fused = vision._fused
        glm.model.visual.blocks[0].register_forward_pre_hook(lambda *_: runs.append(fused._active))
        graphs = counters["stats"]["unique_graphs"]
        for seed, grids in enumerate([[(1, 8, 6)], [(1, 4, 4), (1, 8, 4), (1, 6, 10)]]):
            runs.clear()
            compiled = vision.run(lambda grids=grids, seed=seed: _features(glm, grids, seed))
            assert runs == [True]
            torch.testing.assert_close(compiled, _features(glm, grids, seed), rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs

        def fails_compiled() -> str:
            if fused._active:
                raise RuntimeError("recompile limit reached")
            return "eager"

        assert vision.run(fails_compiled) == "eager"
        assert not vision.compiled
        runs.clear()
        vision.run(lambda: _features(glm, [(1, 4, 6)], 0))
        assert runs == [False]
