"""Diffusion models: the process, the networks' configs and checkpoints, training and purification.

``create_diffusion`` builds every diffusion process; ``load_purifier`` loads every diffusion
model that purifies (or that an attack crafts through)."""

from utils.diffusion.factory import Purifier, create_diffusion, load_purifier, purifier_checkpoint

__all__ = ["Purifier", "create_diffusion", "load_purifier", "purifier_checkpoint"]
