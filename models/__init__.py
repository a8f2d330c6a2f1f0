"""Network definitions: the victim classifiers by name (``classifiers``), improved-diffusion's
UNet (``unet``, with its classifier head in ``unet_classifier``) and the DDPM of DataElixir
(``ddpm``)."""

from models.classifiers import CLASSIFIERS, build_classifier

__all__ = ["CLASSIFIERS", "build_classifier"]
