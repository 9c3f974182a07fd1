"""GLM-4V's vision position embeddings by one matrix product (core/vision_positions.py) against transformers'
own bicubic ``grid_sample``, on a tiny GLM-4.1V-shaped model: the same embeddings and tower output, no host read."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core import vision_attention, vision_positions
from core.model_files import resolve
from core.model_loading import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# Grids smaller and larger than the 24 x 24 table, not square, one of two frames, and several at once.
GRIDS = [[(1, 4, 6)], [(1, 30, 42)], [(1, 24, 24)], [(2, 6, 10)], [(1, 8, 12), (1, 54, 74), (1, 2, 2)]]


@pytest.fixture
def glm() -> Any:
    from glm_model import tiny_glm

    model = tiny_glm()
    torch.nn.init.normal_(model.model.visual.embeddings.position_embedding.weight)  # not a near-flat table
    return model


def _coords(grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images' shapes and each patch's row and column in its image, frames after each other."""
    rows = torch.cat([torch.arange(t * h * w) % (h * w) // w for t, h, w in grids])
    columns = torch.cat([torch.arange(t * h * w) % w for t, h, w in grids])
    return torch.tensor(grids), rows, columns


@pytest.mark.parametrize("grids", GRIDS)
def test_each_patch_gets_grid_samples_embedding(glm, grids):
    embeddings = glm.model.visual.embeddings
    shapes, rows, columns = _coords(grids)
    patches = torch.randn(len(rows), embeddings.embed_dim)
    with torch.inference_mode():
        own = embeddings(patches, shapes.prod(-1), shapes, rows, columns)
        ours = vision_positions.positions_added(embeddings, patches, shapes.prod(-1), shapes, rows, columns)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    # (a patch's own coordinates matter: the same patches in another order get other embeddings)
    with torch.inference_mode():
        shuffled = vision_positions.positions_added(embeddings, patches, shapes.prod(-1), shapes, rows.flip(0),
                                                    columns)
    assert not torch.allclose(shuffled, own, atol=1e-3)


def test_weights_are_bicubic_and_sum_to_one():
    """A row of weights mixes at most four table entries (fewer where the border clamps them), summing to one;
    a patch at the centre of a grid as long as the table reads its own entry."""
    coords = torch.arange(30)
    weights = vision_positions.bicubic_weights(coords, torch.full((30,), 30), 24)
    assert weights.shape == (30, 24)
    torch.testing.assert_close(weights.sum(-1), torch.ones(30))
    assert int((weights != 0).sum(-1).max()) <= 4
    same = vision_positions.bicubic_weights(torch.arange(24), torch.full((24,), 24), 24)
    torch.testing.assert_close(same, torch.eye(24), rtol=0, atol=1e-6)


def test_installed_tower_encodes_as_before_without_host_reads(glm):
    from vision_encoder import HostReads

    grid = torch.tensor([(1, 4, 6), (1, 6, 8)])
    pixels = vision_attention.random_patches(glm.config.vision_config, grid)
    with torch.inference_mode(), HostReads() as before_reads:
        before = glm.model.visual(pixels, grid_thw=grid).pooler_output.clone()
    assert vision_positions.install(glm)
    with torch.inference_mode(), HostReads() as after_reads:
        after = glm.model.visual(pixels, grid_thw=grid).pooler_output.clone()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert after_reads.count == before_reads.count


def test_a_tower_it_cannot_check_keeps_its_own_embeddings(glm, tiny_model: Path, monkeypatch):
    llava = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    assert not vision_positions.install(llava)  # CLIP: a fixed table, nothing resized
    embeddings = glm.model.visual.embeddings
    embeddings.interpolated_method = "bilinear"
    assert not vision_positions.install(glm)
    embeddings.interpolated_method = "bicubic"

    def wrong(module: Any, patches: torch.Tensor, *args: Any) -> torch.Tensor:
        return right(module, patches, *args) * 1.01

    right = vision_positions.positions_added
    monkeypatch.setattr(vision_positions, "positions_added", wrong)
    assert not vision_positions.install(glm)
    assert "forward" not in vars(embeddings)  # its own forward, not an instance's replacement
