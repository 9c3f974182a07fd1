"""GLM-4V's decoder rotary in the projections' own layout (core/text_rotary.py): the same values as
transformers' ``apply_rotary_pos_emb``, computed tokens-first; installed only where both ways agree, and a
GLM-4.1V-shaped model answers the same through it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.glm4v import modeling_glm4v

from core import text_rotary
from core.model_files import resolve
from core.model_loading import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

THEIRS = modeling_glm4v.apply_rotary_pos_emb


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own function back in its module after the test (``install`` replaces it there)."""
    monkeypatch.setattr(modeling_glm4v, "apply_rotary_pos_emb", THEIRS)


def _projected(rows: int, tokens: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """As the attention layer hands it over: ``[rows, heads, tokens, dim]``, a view of the projection's output."""
    generator = torch.Generator().manual_seed(seed)
    output = torch.randn(rows, tokens, heads * dim, generator=generator).to(dtype)
    return output.view(rows, tokens, heads, dim).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "tokens", "width"), [(1, 1, 32), (1, 37, 32), (3, 5, 64), (2, 9, 16)])
def test_the_same_values_as_transformers_rotary(dtype, rows, tokens, width):
    q, k = _projected(rows, tokens, 4, 64, dtype, 1), _projected(rows, tokens, 2, 64, dtype, 2)
    angles = torch.randn(rows, tokens, width, generator=torch.Generator().manual_seed(3))
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    theirs, ours = THEIRS(q, k, cos, sin), text_rotary.rotated(q, k, cos, sin)
    for a, b in zip(theirs, ours, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)
    # Computed tokens-first: the heads-first view of a tensor laid out as the projection's output was.
    assert all(t.transpose(1, 2).is_contiguous() for t in ours)
    assert not all(t.transpose(1, 2).is_contiguous() for t in theirs) or tokens == 1


def test_another_layout_is_refused():
    q = _projected(1, 3, 2, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        text_rotary.rotated(q, q, torch.ones(1, 3, 4), torch.zeros(1, 3, 4), unsqueeze_dim=2)


@pytest.fixture(scope="module")
def glm() -> Any:
    from glm_model import tiny_glm

    return tiny_glm()


def test_installed_for_glm_the_model_computes_the_same(glm, restored):
    from test_prefill_batch import _glm_inputs

    inputs = _glm_inputs(glm.config, (1, 4, 6), [40, 41, 42, 43], seed=5)
    with torch.inference_mode():
        glm.model.rope_deltas = None
        before = glm(**inputs).logits
        assert text_rotary.install(glm)
        assert modeling_glm4v.apply_rotary_pos_emb is text_rotary.rotated
        assert text_rotary.install(glm)  # again: nothing more to do
        glm.model.rope_deltas = None
        after = glm(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_not_installed_where_the_model_is_not_glm_or_the_ways_disagree(tiny_model, glm, restored):
    llava = load(resolve("x", tiny_model, allow_download=False), device="cpu").model
    assert not text_rotary.install(llava)

    def full_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return THEIRS(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), unsqueeze_dim)

    modeling_glm4v.apply_rotary_pos_emb = full_rotary  # (the fixture puts transformers' back)
    assert not text_rotary.install(glm)
    assert modeling_glm4v.apply_rotary_pos_emb is full_rotary
