"""Figures for users: training curves, reconstructions, field traversals, flows and transport.

Every function takes plain tensors / a run directory, writes PNG (or GIF) files with matplotlib's
Agg backend and returns the paths it wrote. Nothing here is imported by the training hot path.
"""
from __future__ import annotations

# --- model plots (sta plot RUN_DIR): loss curves, reconstructions, traversals, latent flows ---

# --- latent grid transport plots (sta.grid): density evolution next to the particle picture ---
