"""Hallucination metrics with exact ground truth (the generic ones of ``reward_models.metrics``, over
ShapeWorld's (colour, shape) objects)."""

from reward_models.metrics import binary_scores, chair

__all__ = ["binary_scores", "chair"]
