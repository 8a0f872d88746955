"""Losses of the Uni-Removal method: contrastive (Eq. 2 / Eq. 9), MGCL, EX-MGCL, GAN, pixel.

The submodules import torch; this file only re-exports the pure-Python weight schedule, so that
importing ``uniremoval.losses`` stays cheap (CLI --help, config validation).
"""

from uniremoval.losses.schedule import decayed_weight

__all__ = ["decayed_weight"]
