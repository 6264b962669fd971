"""The interface every bi-modal (visual question answering) model adapter implements.

An adapter owns one Hugging Face VQA model in eval mode on its device, weights frozen: it
tokenizes questions, turns a batch (`BimodalInputs`) into answer logits, declares its attention
graph (seed 003 §3.2) and records every edge's attention map during a forward pass
(`BimodalModel.record`), so that one backward pass gives ∂y/∂A for the relevance engine. Its
token bookkeeping (`BimodalTokens`) says where the text and image tokens are; `readout` reads
the engine's relevance at the answer token and splits it into text and image parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, TypeAlias

import torch
from torch import Tensor, nn

from vitlens_server.explain.graph.declare import AttentionGraph
from vitlens_server.explain.graph.engine import GraphRelevance
from vitlens_server.models.bimodal.graphs import READOUT
from vitlens_server.models.bimodal.hooks import MapHooks
from vitlens_server.models.bimodal.records import BimodalRecording, BimodalTokens
from vitlens_server.models.loading import ModelLoadError

__all__ = [
    "Architecture",
    "BimodalInputs",
    "BimodalLoadError",
    "BimodalModel",
    "TokenizedQuestions",
    "VisualInput",
]

Architecture: TypeAlias = Literal["single_stream", "two_stream"]
VisualInput: TypeAlias = Literal["pixels", "regions"]
TokenizedQuestions: TypeAlias = tuple[Tensor, Tensor, tuple[tuple[str, ...], ...]]


class BimodalLoadError(ModelLoadError):
    """A bi-modal model could not be loaded: the message names the file or setting to fix."""


@dataclass(frozen=True)
class BimodalInputs:
    """What one batch of B questions with their images feeds a model.

    Attributes:
        ids: (B, T) long token ids, right-padded (`BimodalModel.tokenize`).
        text_mask: (B, T) 1 at real tokens (CLS and SEP included), 0 at padding.
        pixels: (B, 3, H, W) normalised pixels (ViLT), or None.
        pixel_mask: (B, H, W) 1 at real pixels, 0 at padding (ViLT); None: all real.
        regions: (B, R, F) detector region features (VisualBERT, LXMERT), or None.
        boxes: (B, R, 4) region boxes (x1, y1, x2, y2) normalised to [0, 1] (LXMERT needs them).
        region_mask: (B, R) 1 at real regions, 0 at padding; None: all real.
        patch_mask: (B, L) 1 at the patch tokens the model reads, 0 at removed ones (ViLT
            only; token perturbation, `BimodalModel.remove_tokens`), columns in the patch-slot
            order of `BimodalTokens.image_valid`; None: every real patch is read.
    """

    ids: Tensor
    text_mask: Tensor
    pixels: Tensor | None = None
    pixel_mask: Tensor | None = None
    regions: Tensor | None = None
    boxes: Tensor | None = None
    region_mask: Tensor | None = None
    patch_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.text_mask.shape != self.ids.shape:
            raise ValueError(
                f"ids and text_mask must both be (B, T); got {tuple(self.ids.shape)} and "
                f"{tuple(self.text_mask.shape)}"
            )
        b = self.ids.shape[0]
        if (self.pixels is None) == (self.regions is None):
            raise ValueError("give either pixels (ViLT) or region features, not both or neither")
        if self.patch_mask is not None:
            if self.pixels is None:
                raise ValueError(
                    "patch_mask is for pixel inputs; regions are removed by region_mask"
                )
            if self.patch_mask.dim() != 2 or self.patch_mask.shape[0] != b:
                raise ValueError(f"patch_mask must be ({b}, L); got {tuple(self.patch_mask.shape)}")
        if self.pixels is not None:
            if self.pixels.dim() != 4 or self.pixels.shape[:2] != (b, 3):
                raise ValueError(f"pixels must be ({b}, 3, H, W); got {tuple(self.pixels.shape)}")
            want = (b, *self.pixels.shape[2:])
            if self.pixel_mask is not None and tuple(self.pixel_mask.shape) != want:
                raise ValueError(f"pixel_mask must be {want}; got {tuple(self.pixel_mask.shape)}")
            return
        assert self.regions is not None
        if self.regions.dim() != 3 or self.regions.shape[0] != b:
            raise ValueError(f"regions must be ({b}, R, F); got {tuple(self.regions.shape)}")
        r = self.regions.shape[1]
        if self.boxes is not None and tuple(self.boxes.shape) != (b, r, 4):
            raise ValueError(f"boxes must be ({b}, {r}, 4); got {tuple(self.boxes.shape)}")
        if self.region_mask is not None and tuple(self.region_mask.shape) != (b, r):
            raise ValueError(f"region_mask must be ({b}, {r}); got {tuple(self.region_mask.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> BimodalInputs:
        """The same inputs on ``device``."""
        moved = {
            name: None if value is None else value.to(device) for name, value in vars(self).items()
        }
        return BimodalInputs(**moved)


class BimodalModel(ABC):
    """A loaded VQA model over a question and an image.

    Attributes:
        module: the library's model (eval mode, weights frozen; never change it).
        source: where it was loaded from.
        tokenizer: its ``transformers.BertTokenizer``.
        answers: the answer of each logit, (A,).
        max_text_length: the longest token sequence the model takes (CLS and SEP included).
    """

    architecture: ClassVar[Architecture]
    visual_input: ClassVar[VisualInput]

    def __init__(
        self,
        module: nn.Module,
        *,
        graph: AttentionGraph,
        tokenizer: Any,
        answers: Sequence[str],
        source: str,
        max_text_length: int,
    ) -> None:
        if len(answers) != self.head_size(module):
            raise ValueError(f"{len(answers)} answers for {self.head_size(module)} logits")
        self.module = module
        self.tokenizer = tokenizer
        self.answers = tuple(answers)
        self.source = source
        self.max_text_length = int(max_text_length)
        self._graph = graph
        special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        self._special_ids = torch.tensor([i for i in special if i is not None])
        self._hooks = MapHooks(graph, module)

    # --- what each library adapter provides -----------------------------------------------

    @abstractmethod
    def _prepare(self, inputs: BimodalInputs) -> tuple[dict[str, Any], BimodalTokens]:
        """The library call's keyword arguments for ``inputs`` and the batch's tokens."""

    @abstractmethod
    def _logits(self, kwargs: dict[str, Any]) -> Tensor:
        """The library model on ``kwargs`` → (B, A) answer logits."""

    @staticmethod
    @abstractmethod
    def head_size(module: nn.Module) -> int:
        """The number of answer logits of the library model's head."""

    @abstractmethod
    def _check_visual(self, inputs: BimodalInputs) -> None:
        """Raise ValueError where the visual inputs do not fit the model."""

    # --- the common interface -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def tokenize(self, questions: Sequence[str]) -> TokenizedQuestions:
        """Questions → (ids (B, T) long, mask (B, T) long, each question's token strings).

        ``[CLS] ... [SEP]``, right-padded to the longest question, truncated to
        `max_text_length`; the token strings of question b are those of its real positions
        (``mask[b].sum()`` of them, CLS and SEP included), position t = column t of ``ids``.
        """
        if isinstance(questions, str):
            raise TypeError("tokenize takes a sequence of questions, not one string")
        enc = self.tokenizer(
            list(questions),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        tokens = tuple(
            tuple(self.tokenizer.convert_ids_to_tokens(row[: int(n)].tolist()))
            for row, n in zip(ids, mask.sum(dim=1), strict=True)
        )
        return ids.to(self.device), mask.to(self.device), tokens

    def graph(self, tokens: BimodalTokens | None = None) -> AttentionGraph:
        """The attention graph; with ``tokens``, its sets sized for that batch (else None:
        the engine reads the sizes from the maps)."""
        if tokens is None:
            return self._graph
        sets = tuple(replace(s, size=tokens.sizes[s.name]) for s in self._graph.sets)
        return AttentionGraph(sets, self._graph.steps, self._graph.readouts)

    def tokens(self, inputs: BimodalInputs) -> BimodalTokens:
        """The token bookkeeping of ``inputs``, without running the model."""
        self._check(inputs)
        with torch.no_grad():
            return self._prepare(inputs)[1]

    def forward(self, inputs: BimodalInputs) -> Tensor:
        """(B, A) answer logits; inside `record` the pass also captures every edge's map.

        Run it with grad enabled (not under ``torch.no_grad``) to take gradients afterwards.
        """
        self._check(inputs)
        kwargs, tokens = self._prepare(inputs)
        rec = self._hooks.active
        if rec is not None:
            if rec.tokens is not None:
                raise RuntimeError("the model already ran in this recording")
            rec.tokens = tokens
        logits = self._logits(kwargs)
        if rec is not None:
            rec.check()
        return logits

    __call__ = forward

    @contextmanager
    def record(self) -> Iterator[BimodalRecording]:
        """Record the maps (and tokens) of the one forward pass this thread runs in the block.

        ``recording.maps`` lists A (B, h, q, k) per edge of ``graph().edges``;
        ``recording.layer_maps(logits[b, c_b])`` gives the engine's inputs.
        """
        with self._hooks.record() as recording:
            yield recording

    def readout(self, relevance: GraphRelevance, tokens: BimodalTokens) -> tuple[Tensor, Tensor]:
        """The answer token's relevance over the text and the image (seed 003 §3.2).

        Single stream: the readout row of R^{joint,joint}, split into its text and image
        columns; two streams: the CLS rows of R^{tt} and R^{ti}.

        Returns:
            (text (B, T), image (B, M)): text aligned with the token ids, 0 at CLS, SEP and
            padding; image per patch slot / region (`BimodalTokens.image_positions`, no image
            CLS), 0 at padding slots. The full matrices keep every token.
        """
        rows = relevance.read(READOUT, rows=tokens.readout_rows)
        text = rows[tokens.text_set][:, tokens.text_positions.to(rows[tokens.text_set].device)]
        image = rows[tokens.image_set][:, tokens.image_positions.to(text.device)]
        text = text.masked_fill(~tokens.text_valid.to(text.device), 0)
        image = image.masked_fill(~tokens.image_valid.to(image.device), 0)
        return text, image

    def remove_tokens(
        self,
        inputs: BimodalInputs,
        *,
        text: Tensor | None = None,
        image: Tensor | None = None,
    ) -> BimodalInputs:
        """``inputs`` with tokens removed as the model's own "absent" input (seed 003 §4).

        Args:
            inputs: the batch.
            text: (B, T) bool, True at the text positions to remove; only word tokens
                (`BimodalTokens.text_valid`) go, CLS, SEP and padding stay as they are.
            image: (B, M) bool, True at the image tokens to remove (columns as
                `BimodalTokens.image_valid`); padding slots stay padding.

        By default a removed token is masked the way the model masks padding: text_mask 0
        (text), region_mask 0 (regions). Adapters that need another way override
        `_remove_text` / `_remove_image` and say so in their docstring. The token
        bookkeeping of the result (`tokens`) still lists the removed tokens as real.
        """
        if text is not None:
            if tuple(text.shape) != tuple(inputs.ids.shape):
                raise ValueError(f"text removal must be {tuple(inputs.ids.shape)}")
            inputs = self._remove_text(inputs, text.to(inputs.ids.device).bool())
        if image is not None:
            if image.dim() != 2 or image.shape[0] != inputs.batch_size:
                raise ValueError(f"image removal must be ({inputs.batch_size}, M)")
            inputs = self._remove_image(inputs, image.bool())
        return inputs

    def _remove_text(self, inputs: BimodalInputs, remove: Tensor) -> BimodalInputs:
        """Removed word tokens (``remove`` (B, T) bool) get text_mask 0."""
        drop = remove & self._word_tokens(inputs)
        return replace(inputs, text_mask=inputs.text_mask.masked_fill(drop, 0))

    def _remove_image(self, inputs: BimodalInputs, remove: Tensor) -> BimodalInputs:
        """Removed regions (``remove`` (B, R) bool) get region_mask 0."""
        assert inputs.regions is not None
        shape = tuple(inputs.regions.shape[:2])
        if tuple(remove.shape) != shape:
            raise ValueError(f"image removal must be {shape} (one column per region)")
        mask = inputs.region_mask
        if mask is None:
            mask = inputs.text_mask.new_ones(shape, device=inputs.regions.device)
        return replace(inputs, region_mask=mask.masked_fill(remove.to(mask.device), 0))

    def close(self) -> None:
        """Remove the recording hooks (the model is then exactly as the library built it)."""
        self._hooks.close()

    # --- helpers for the adapters ---------------------------------------------------------

    def _check(self, inputs: BimodalInputs) -> None:
        want_pixels = self.visual_input == "pixels"
        if want_pixels != (inputs.pixels is not None):
            raise ValueError(f"{type(self).__name__} takes {self.visual_input}")
        if inputs.ids.shape[1] > self.max_text_length:
            raise ValueError(
                f"{inputs.ids.shape[1]} text tokens; the model takes {self.max_text_length}"
            )
        self._check_visual(inputs)

    @staticmethod
    def _region_mask(inputs: BimodalInputs) -> Tensor:
        """(B, R) the regions' mask: the given one, or all real."""
        assert inputs.regions is not None
        if inputs.region_mask is not None:
            return inputs.region_mask
        b, r = inputs.regions.shape[:2]
        return torch.ones(b, r, dtype=inputs.text_mask.dtype, device=inputs.regions.device)

    def _word_tokens(self, inputs: BimodalInputs) -> Tensor:
        """(B, T) bool: real tokens other than CLS, SEP and padding."""
        special = torch.isin(inputs.ids, self._special_ids.to(inputs.ids.device))
        return inputs.text_mask.bool() & ~special
