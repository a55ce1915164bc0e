"""Decoder-only language models (Flax NNX)."""

from dsjax.models.decoder import FAMILIES, Decoder, param_counts

__all__ = ["FAMILIES", "Decoder", "param_counts"]
