"""Compatibility module: the model kinds live in :mod:`sta.models` (one class per kind over one base).

``from sta.model import STAModel, ModelConfig, MODELS, ELBOTerms`` keeps working; saved runs
(config.json with ``"model": "sta"`` etc.) load through the same registry.
"""
from .models import MODELS, ConvDecoder, ConvEncoder, ELBOTerms, ModelConfig, STAModel

__all__ = ["MODELS", "ModelConfig", "ELBOTerms", "STAModel", "ConvEncoder", "ConvDecoder"]
