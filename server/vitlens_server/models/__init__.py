"""Model specs, weight loading and the registry of loaded models."""

from vitlens_server.models.loading import LoadedModel, ModelGeometry, ModelSpec, load_model
from vitlens_server.models.registry import ModelRegistry

__all__ = ["LoadedModel", "ModelGeometry", "ModelRegistry", "ModelSpec", "load_model"]
