"""Loaded models by served name, with one default."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vitlens_server.errors import ECHO_CHARS, NotFound, clip
from vitlens_server.models.loading import LoadedModel

__all__ = ["ModelRegistry"]


class ModelRegistry:
    """Immutable after construction; the first model is the default unless one is named."""

    def __init__(self, models: Iterable[LoadedModel], default: str | None = None) -> None:
        self._models: dict[str, LoadedModel] = {}
        for model in models:
            if model.name in self._models:
                raise ValueError(f"two models are named {model.name!r}")
            self._models[model.name] = model
        if not self._models:
            raise ValueError("a registry needs at least one model")
        self.default_name = default or next(iter(self._models))
        if self.default_name not in self._models:
            raise ValueError(f"default model {self.default_name!r} is not loaded")

    def get(self, name: str = "") -> LoadedModel:
        """The model called ``name``, or the default for an empty name."""
        model = self._models.get(name or self.default_name)
        if model is None:
            raise NotFound(
                f"unknown model {clip(name)}; this server has: {', '.join(self._models)}",
                resource=("model", name[:ECHO_CHARS]),
            )
        return model

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
