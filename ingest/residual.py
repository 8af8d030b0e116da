"""How a transcoder reads the residual stream, for the input-independent (weights-only) maths.

A transcoder reading `ln2.hook_normalized` sees the residual after the model's norm. The norm's
scale depends on the input and is left out of weights-only edges (the seed's convention), but a
LayerNorm's mean subtraction is linear and input-independent, so it is applied: that makes a stored
pullback exactly the frozen-scale gradient times the scale. RMSNorm models have no centring.
"""

from __future__ import annotations

import torch
from circuit_catalog.ingest.transcoder import Transcoder

NORMALISED_INPUTS = ("ln2.hook_normalized", "mlp.hook_in")


def reads_normalised(tc: Transcoder) -> bool:
    return tc.cfg.hook_in.endswith(NORMALISED_INPUTS)


def scale_hook(tc: Transcoder) -> str | None:
    """The hook holding the norm scale (the RMSNorm/LayerNorm denominator, [batch, pos, 1]) at `tc`'s input, or None
    for a transcoder reading the raw residual stream (scale 1)."""
    return f"blocks.{tc.layer}.ln2.hook_scale" if reads_normalised(tc) else None


def centres(model) -> bool:
    """Whether the model's norms subtract the mean (LayerNorm) rather than only rescale (RMSNorm)."""
    return model.cfg.normalization_type in ("LN", "LNPre")


def as_read_by(model, reader: Transcoder | None, vectors: torch.Tensor) -> torch.Tensor:
    """Residual-stream vectors [..., d_model] as `reader`'s input sees them, up to the norm's scale.

    `reader=None` means the unembedding, which reads through the final norm.
    """
    if (reader is None or reads_normalised(reader)) and centres(model):
        return vectors - vectors.mean(-1, keepdim=True)
    return vectors


def normalise_as_read_by(model, reader: Transcoder, vectors: torch.Tensor) -> torch.Tensor:
    """Apply the reader's whole norm (centring and scale) to each vector, as the forward pass would."""
    if not reads_normalised(reader):
        return vectors
    return model.blocks[reader.layer].ln2(vectors)
