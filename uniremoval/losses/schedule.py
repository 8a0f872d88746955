"""Per-epoch decay of the feature-level weights (a1 in KT, l1 in DA; the paper decays both x0.99)."""

from __future__ import annotations


def decayed_weight(w0: float, decay: float, epoch: int) -> float:
    """w0 * decay**epoch: the weight to use during epoch ``epoch`` (0-based, so epoch 0 uses w0)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if decay <= 0:
        raise ValueError(f"decay must be > 0, got {decay}")
    return float(w0) * float(decay) ** int(epoch)
