"""``betavae``: the static VAE with the KL terms weighted by ``beta`` in the loss (Higgins et al. 2017).

``nelbo`` stays the unweighted bound, so it is comparable with every other kind; only ``loss`` (what
is minimised) carries ``beta * kl_weight``. ``beta`` defaults to 4 (Higgins et al.'s dSprites
setting); ``beta = 1`` is exactly the ``static`` model.
"""
from __future__ import annotations

from .registry import register
from .static import Static

__all__ = ["BetaVAE"]


@register
class BetaVAE(Static):
    name = "betavae"
    options = {"beta": (4.0, 0.0, False)}  # default, lower bound, bound excluded

    @property
    def kl_scale(self) -> float:
        return float(self.option("beta"))
