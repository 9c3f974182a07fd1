"""GLM-4V's vision position embeddings by one matrix product instead of ``grid_sample``.

The vision tower adds to each patch its learned position table (24 x 24 entries for GLM-4.6V-Flash),
resized bicubically to the image's patch grid. transformers does that with ``F.grid_sample`` over all the
patches in float32, a GPU thread a patch walking all 1,536 channels: 2.6 ms of a 1024x768 screenshot's
~25-ms vision encoder on the H200, 7.9 ms for the three encoder runs of eight screenshots at once
(bench/RESULTS.md, twentieth step). Bicubic resizing is separable: a patch's entry mixes four rows and
four columns of the table with weights that depend only on where the patch sits in its grid. So each
patch's 16 weights are spread into a row of ``[patches, entries]`` and one matrix product with the table
gives every patch's embedding: the same float32 math as ``grid_sample``'s bicubic (A = -0.75, border
padding, corners not aligned), summed in another order, and no host sync (the images' sizes stay on the GPU).

Installed on the tower's embeddings alone, after both ways have given the same embeddings (to float32
rounding) on two dummy grids (``install``).
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

__all__ = ["bicubic_weights", "install", "positions_added"]

log = logging.getLogger(__name__)

_A = -0.75  # the cubic convolution's constant, as grid_sample's bicubic (and PIL's) take it
# Both ways agree to float32 rounding: measured ~1e-7 of the table's largest entry; anything near this
# is another resize, not another summation order.
_TOLERANCE = 1e-4


def bicubic_weights(coords: torch.Tensor, size: torch.Tensor, table: int) -> torch.Tensor:
    """``[patches, table]`` float32: the weight of each of ``table`` source entries in a patch at integer
    ``coords`` of a grid ``size`` long (both per patch), as ``grid_sample`` computes them."""
    normalised = ((coords.to(torch.float32) + 0.5) / size.to(torch.float32)) * 2 - 1  # (as transformers does)
    source = ((normalised + 1) * table - 1) / 2  # grid_sample's unnormalising, corners not aligned
    first = torch.floor(source)
    t = (source - first).unsqueeze(-1)
    near = torch.cat([t, 1 - t], dim=-1)  # distances to the two inner taps
    far = near + 1  # and to the two outer ones
    inner = ((_A + 2) * near - (_A + 3)) * near * near + 1
    outer = ((_A * far - 5 * _A) * far + 8 * _A) * far - 4 * _A
    weights = torch.stack([outer[:, 0], inner[:, 0], inner[:, 1], outer[:, 1]], dim=-1)
    # Border padding: a tap outside the table reads its edge entry.
    taps = (first.to(torch.long).unsqueeze(-1) + torch.arange(-1, 3, device=coords.device)).clamp(0, table - 1)
    entries = torch.arange(table, device=coords.device)
    # A sum over the four taps in a fixed order, not a scatter: taps clamped onto one entry add up the same way
    # every run.
    return (weights.unsqueeze(-1) * (taps.unsqueeze(-1) == entries)).sum(dim=1)


def positions_added(module: Any, embeddings: torch.Tensor, lengths: Any, image_shapes: torch.Tensor,
                    h_coords: torch.Tensor, w_coords: torch.Tensor) -> torch.Tensor:
    """``embeddings`` with each patch's position embedding added: what transformers' GLM-4V vision
    embeddings' ``forward`` returns (the same arguments), by ``bicubic_weights`` and one matrix product."""
    weight = module.position_embedding.weight
    side = int(weight.shape[0] ** 0.5)
    if isinstance(lengths, list):
        lengths = torch.tensor(lengths, device=weight.device, dtype=torch.long)
    image_shapes = image_shapes.to(embeddings.device)
    patches = torch.arange(embeddings.shape[0], device=embeddings.device)
    image = (patches.unsqueeze(0) >= lengths.to(embeddings.device).cumsum(0).unsqueeze(1)).sum(0)
    rows = bicubic_weights(h_coords.to(embeddings.device), image_shapes[image, 1], side)
    columns = bicubic_weights(w_coords.to(embeddings.device), image_shapes[image, 2], side)
    mixing = (rows.unsqueeze(-1) * columns.unsqueeze(1)).reshape(len(patches), side * side)
    adapted: torch.Tensor = mixing @ weight.to(device=embeddings.device, dtype=torch.float32)
    return embeddings + adapted.to(weight.dtype)


def install(model: Any) -> bool:
    """``positions_added`` in place of the vision tower's own bicubic ``grid_sample`` where the tower is
    GLM-4V's and both give the same embeddings on two dummy grids; ``False`` where not (it keeps its own)."""
    embeddings: Any = getattr(getattr(getattr(model, "model", None), "visual", None), "embeddings", None)
    table = getattr(embeddings, "position_embedding", None)
    if getattr(embeddings, "interpolated_method", None) != "bicubic" or not isinstance(table, torch.nn.Embedding):
        return False
    device = table.weight.device
    # Two grids at once: one smaller than the table in both directions, one larger and not square.
    grids = [(4, 6), (30, 42)]
    shapes = torch.tensor([(1, rows, columns) for rows, columns in grids], device=device)
    h = torch.cat([torch.arange(rows, device=device).repeat_interleave(columns) for rows, columns in grids])
    w = torch.cat([torch.arange(columns, device=device).repeat(rows) for rows, columns in grids])
    lengths = shapes.prod(-1)
    zeros = torch.zeros(len(h), table.weight.shape[1], device=device, dtype=torch.float32)
    with torch.inference_mode():
        own = embeddings(zeros, lengths, shapes, h, w).float()
        ours = positions_added(embeddings, zeros, lengths, shapes, h, w).float()
    # Both are rounded to the table's dtype at the end, where one value may round one step apart.
    tolerance = max(_TOLERANCE, torch.finfo(table.weight.dtype).eps) * (float(own.abs().max()) or 1.0)
    if own.shape != ours.shape or float((own - ours).abs().max()) > tolerance:
        log.warning("the vision encoder's position embeddings stay as loaded: the matrix way disagrees here")
        return False
    embeddings.forward = types.MethodType(positions_added, embeddings)
    return True
