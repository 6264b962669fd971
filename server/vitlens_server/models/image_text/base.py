"""The interface every image-text (dual-encoder, CLIP-style) model adapter implements.

An adapter owns one library model in eval mode on its device, with its weights frozen: it
encodes normalised pixels and token ids into L2-normalised embeddings, scores them as the model
defines (``logit_scale.exp() · cosine (+ logit_bias)``), tokenizes texts, knows its
preprocessing and the attention graph of each tower, and records both towers' attention
(`ImageTextModel.record`, `recording.capture`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlens_server.imaging import normalise_pixels
from vitlens_server.models.image_text.hooks import TowerHooks
from vitlens_server.models.image_text.records import ImageTextRecording, TowerGraph
from vitlens_server.models.image_text.tokenizer import BpeTokenizer, TokenizedTexts
from vitlens_server.models.loading import ModelLoadError

__all__ = ["ImageTextLoadError", "ImageTextModel", "Preprocess", "readout_weights"]


class ImageTextLoadError(ModelLoadError):
    """An image-text model could not be loaded: the message names the file or setting to fix."""


@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for the image tower, from the checkpoint's configuration.

    Attributes:
        input_size: (C, H, W) the image tower's input.
        mean, std: per-channel normalisation of pixels in [0, 1].
        interpolation: resize filter (``bicubic``, ``bilinear``...).
        resize_mode: ``shortest`` (resize the short side to H, centre-crop), ``longest``
            (resize the long side, pad) or ``squash`` (resize to H x W).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def normalise(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [0, 1] → the tower's normalised input."""
        return normalise_pixels(pixels, self.mean, self.std)


class ImageTextModel(ABC):
    """A loaded dual-encoder model with ViT image and Transformer text towers.

    Attributes:
        module: the library's model (eval mode, weights frozen; never change it).
        source: where it was loaded from (``open_clip:/models/dir``...).
        tokenizer: its BPE tokenizer.
        preprocess: the image tower's input geometry and normalisation.
        image_graph, text_graph: the attention graph of each tower.
        embed_dim: D, the width of both towers' embeddings.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        source: str,
        tokenizer: BpeTokenizer,
        preprocess: Preprocess,
        image_hooks: TowerHooks,
        text_hooks: TowerHooks,
        image_read_rows: Tensor,
        embed_dim: int,
    ) -> None:
        self.module = module
        self.source = source
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.embed_dim = int(embed_dim)
        self._image_hooks = image_hooks
        self._text_hooks = text_hooks
        self._image_read_rows = image_read_rows  # (N,)

    # --- what each library adapter provides -----------------------------------------------

    @abstractmethod
    def _image_features(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels → (B, D) image embeddings, not normalised."""

    @abstractmethod
    def _text_features(self, ids: Tensor, valid: Tensor | None) -> Tensor:
        """(M, L) ids and (M, L) valid mask (or None) → (M, D) text embeddings, not normalised."""

    @abstractmethod
    def pooled_index(self, ids: Tensor) -> Tensor:
        """(M, L) ids → (M,) the position each text embedding is read at."""

    @property
    @abstractmethod
    def logit_scale(self) -> Tensor:
        """The model's learnt log temperature (a scalar tensor); logits use its ``exp()``."""

    @property
    def logit_bias(self) -> Tensor | None:
        """The model's logit bias (SigLIP-style models); None for CLIP."""
        return None

    # --- the common interface -------------------------------------------------------------

    @property
    def image_graph(self) -> TowerGraph:
        return self._image_hooks.graph

    @property
    def text_graph(self) -> TowerGraph:
        return self._text_hooks.graph

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Texts → `TokenizedTexts` on the model's device, padded to the context length."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a sequence of texts, not one string")
        ids, valid, tokens = self.tokenizer.encode(texts)
        return TokenizedTexts(tuple(texts), ids, valid, tokens, self.pooled_index(ids)).to(
            self.device
        )

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels (`Preprocess.normalise`) → (B, D) unit embeddings."""
        want = self.preprocess.input_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"images must be (B, {', '.join(map(str, want))}); got {pixels.shape}")
        rec = self._fresh(self._image_hooks)
        features = self._image_features(pixels)  # (B, D)
        if rec is not None:
            rec.read_rows = self._image_read_rows.to(features).expand(len(pixels), -1)
        return F.normalize(features, dim=-1)

    def encode_texts(self, ids: Tensor | TokenizedTexts, valid: Tensor | None = None) -> Tensor:
        """(M, L) token ids (or `TokenizedTexts`) → (M, D) unit embeddings.

        Args:
            ids: token ids padded to the context length, or the output of `tokenize`.
            valid: (M, L) bool, False at padding; towers that mask padding (Hugging Face CLIP)
                use it, open_clip towers derive their masks from the ids as the model does.
                Taken from ``ids`` when it is a `TokenizedTexts`.
        """
        if isinstance(ids, TokenizedTexts):
            ids, valid = ids.ids, ids.valid
        if ids.dim() != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"token ids must be (M, {self.context_length}); got {ids.shape}")
        rec = self._fresh(self._text_hooks)
        features = self._text_features(ids, valid)  # (M, D)
        if rec is not None:
            rows = self.pooled_index(ids)
            rec.read_rows = F.one_hot(rows, ids.shape[1]).to(features)
        return F.normalize(features, dim=-1)

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(B, D), (M, D) unit embeddings → (B, M) logits ``logit_scale.exp() · cos (+ bias)``."""
        logits = self.logit_scale.exp() * image_embeds @ text_embeds.T
        bias = self.logit_bias
        return logits if bias is None else logits + bias

    @contextmanager
    def record(
        self, *, text_inputs: bool = False, lrp: bool = False
    ) -> Iterator[ImageTextRecording]:
        """Record both towers' attention for the passes this thread runs in the block.

        Each tower may run once per recording. The passes build a graph from the first attention
        output on (when grad is enabled), so `recording.ImageTextCapture.gradients` can take
        ∂y/∂O of every layer; ``text_inputs`` also records the text tower's token embeddings
        (`TowerRecording.inputs`), the graph then starting there; ``lrp`` both towers' LRP
        activations (`TowerRecording.blocks`; `lrp_problem` says when a tower has none).
        """
        with ExitStack() as stack:
            images = stack.enter_context(self._image_hooks.record(lrp=lrp))
            texts = stack.enter_context(self._text_hooks.record(inputs=text_inputs, lrp=lrp))
            yield ImageTextRecording(images, texts)

    @property
    def lrp_problem(self) -> str | None:
        """Why LRP relevances cannot be propagated through this model, or None when both
        towers record their LRP activations."""
        missing = [h.graph.tower for h in (self._image_hooks, self._text_hooks) if h.lrp is None]
        if not missing:
            return None
        return (
            f"the {' and '.join(missing)} tower{'s' if len(missing) > 1 else ''} of this model "
            "has no LRP rules in vitlens (they cover towers read at the class / EOT token "
            "through the final norm and one linear projection)"
        )

    def lrp_weights(self, tower: str) -> tuple[list[dict[str, Tensor]], Tensor]:
        """The weights LRP reads of ``tower`` (`hooks.LrpTaps.weights`)."""
        hooks = self._image_hooks if tower == "image" else self._text_hooks
        if hooks.lrp is None:
            raise RuntimeError(self.lrp_problem)
        return hooks.lrp.weights()

    def close(self) -> None:
        """Remove the recording hooks (the model is then exactly as the library built it)."""
        self._image_hooks.close()
        self._text_hooks.close()

    @staticmethod
    def _fresh(hooks: TowerHooks):
        rec = hooks.active
        if rec is not None and rec.layers:
            raise RuntimeError(f"the {hooks.graph.tower} tower already ran in this recording")
        return rec


def readout_weights(num_tokens: int, rows: Sequence[int] | slice) -> Tensor:
    """(N,) readout weights: uniform over ``rows`` (one-hot for one row)."""
    weights = torch.zeros(num_tokens)
    weights[rows] = 1.0
    return weights / weights.sum()
