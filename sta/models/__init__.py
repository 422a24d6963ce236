"""Model kinds of the STA harness (docs/maths.md sections 4 and 6), one class each over one base.

    base.py      STAModel: encoder, decoder, likelihood, the ELBO skeleton, rollout; CoefficientModel:
                 the spike-and-slab posterior on frame pairs (sta, dense, linear)
    config.py    ModelConfig; CoefficientLayout (single / double control, decoded there only)
    registry.py  name -> kind class, filled by @register
    networks.py  the conv encoder and decoder

Kinds (``ModelConfig.model``), each in its own module:

    "sta"      spike-and-slab coefficients, learned potential + rotational fields (the method)
    "static"   no transitions: z_0 is decoded for every frame
    "linear"   spike-and-slab coefficients, each field a learned constant direction d_k
    "dense"    sta without the spike prior: every field on at every step, g = s
    "betavae"  static with the KL weighted by beta in the loss
    "slowvae"  every frame encoded, Laplace prior on z_t - z_{t-1} (Klindt et al. 2021)

``STAModel(config)`` builds the kind named by ``config.model``. A new kind is one module with a
``@register``-ed subclass (defining its transition ``step``, its ``latent_path`` or ``transport``
and ``infer_coefficients``), imported below, and one test file.
"""
from .base import CoefficientModel, ELBOTerms, STAModel
from .config import CoefficientLayout, ModelConfig
from .networks import ConvDecoder, ConvEncoder
from .registry import KINDS, kind_class, register

# every built-in kind registers itself on import; the order is the order of MODELS
from .sta import STA  # noqa: E402  (isort: keep after the base)
from .static import Static  # noqa: E402
from .linear import Linear  # noqa: E402
from .dense import Dense  # noqa: E402
from .betavae import BetaVAE  # noqa: E402
from .slowvae import SlowVAE  # noqa: E402

#: The names of the built-in kinds (``--model NAME``).
MODELS = tuple(KINDS)

__all__ = ["MODELS", "KINDS", "ModelConfig", "CoefficientLayout", "ELBOTerms", "STAModel", "CoefficientModel",
           "ConvEncoder", "ConvDecoder", "register", "kind_class",
           "STA", "Static", "Linear", "Dense", "BetaVAE", "SlowVAE"]
