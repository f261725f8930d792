"""metamixer-hub: vision backbones registered with timm.

``import backbones`` registers every hub model with timm, then use ``timm.create_model(name, ...)``.
"""
from . import davit, ffnet, halonet, msmlp, overlock, spikformer, transnext, van  # noqa: F401

__version__ = "0.1.0"
