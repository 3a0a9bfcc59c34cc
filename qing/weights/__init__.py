"""Adapters from foreign checkpoint formats to qing models."""

from qing.weights.original import convert_original_hybrid, is_original_hybrid

__all__ = ["convert_original_hybrid", "is_original_hybrid"]
