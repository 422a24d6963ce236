"""``dense``: STA without the spike prior: every field is on at every step, ``g = s`` (no spike
logits, no spike KL). Identification scores are the inferred speeds (a field counts as active when
its speed exceeds 1/2)."""
from __future__ import annotations

from .registry import register
from .sta import STA

__all__ = ["Dense"]


@register
class Dense(STA):
    name = "dense"
    spikes = False
