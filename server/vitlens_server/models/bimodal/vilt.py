"""ViLT (``transformers.ViltForQuestionAnswering``): one joint text+patch sequence (single stream).

Joint order: text positions 0..T-1 (CLS at 0, ..., SEP, padding), the image CLS at T, patch
tokens T+1..T+L. The answer is read at the text CLS (row 0), through the pooler.

ViLT's own patch embedding (``ViltEmbeddings.visual_embed``) draws a random order of the patch
tokens on every call (and fills padding slots at random). The adapter calls ``visual_embed``
itself, sorts the patch tokens into raster order (real patches first, then the padding slots),
zeroes the padding slots' embeddings (masked keys: no real token reads them) and passes them as
``image_embeds``: attention does not depend on token order, so the logits are the model's own
(up to float rounding), every call gives the same tokens and maps, and the cell of every patch
token is known. Every patch is kept: the config's ``max_image_length`` random subsampling is
not applied.

Token removal (`BimodalModel.remove_tokens`, seed 003 §4 perturbation): a removed word token
gets text_mask 0; a removed patch token gets 0 in the (B, 1+L) image token mask
(``BimodalInputs.patch_mask``), the mask ViLT gives padding slots: no token attends to it.
The image CLS is never removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from vitlens_server.models.bimodal.base import BimodalInputs, BimodalModel
from vitlens_server.models.bimodal.graphs import JOINT, single_stream_graph
from vitlens_server.models.bimodal.records import BimodalTokens

__all__ = ["ViltAdapter", "raster_order"]

DROPOUT_PATH = "vilt.encoder.layer.{}.attention.attention.dropout"


def raster_order(cells: Tensor, valid: Tensor, grid: tuple[int, int]) -> Tensor:
    """The (B, L) permutation that sorts ViLT's drawn patch slots into raster order, real
    patches first, then the padding slots: ``cells`` (B, L, 2) (row, column) as
    ``visual_embed`` returns them, ``valid`` (B, L) bool, ``grid`` (rows, columns)."""
    rows, cols = grid
    key = cells[..., 0] * cols + cells[..., 1] + (~valid).long() * (rows * cols)
    return key.argsort(dim=1, stable=True)


class ViltAdapter(BimodalModel):
    """A transformers ``ViltForQuestionAnswering``: pixels in, one joint sequence."""

    architecture = "single_stream"
    visual_input = "pixels"

    def __init__(
        self, module: nn.Module, *, tokenizer: Any, answers: Sequence[str], source: str
    ) -> None:
        config = module.config
        super().__init__(
            module,
            graph=single_stream_graph(config.num_hidden_layers, DROPOUT_PATH),
            tokenizer=tokenizer,
            answers=answers,
            source=source,
            max_text_length=config.max_position_embeddings,
        )

    @staticmethod
    def head_size(module: nn.Module) -> int:
        """The number of answer logits (the classifier's last Linear)."""
        return int(module.classifier[-1].out_features)

    def _check_visual(self, inputs: BimodalInputs) -> None:
        assert inputs.pixels is not None
        size = self.module.config.patch_size
        h, w = inputs.pixels.shape[2:]
        if h < size or w < size:
            raise ValueError(f"images of {h} x {w} px hold no {size} x {size} px patch")
        if inputs.pixel_mask is not None and not inputs.pixel_mask.flatten(1).any(dim=1).all():
            raise ValueError("an image's pixel_mask marks no real pixel")

    def _prepare(self, inputs: BimodalInputs) -> tuple[dict[str, Any], BimodalTokens]:
        pixels = inputs.pixels
        assert pixels is not None
        mask = inputs.pixel_mask
        if mask is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)
        embeds, embeds_mask, (cells, (gh, gw)) = self.module.vilt.embeddings.visual_embed(
            pixels, mask.to(pixels.device), max_image_length=-1
        )  # (B, 1+L, D), (B, 1+L), ((B, L, 2), grid)
        patch_valid = embeds_mask[:, 1:].bool()  # (B, L)
        order = raster_order(cells, patch_valid, (int(gh), int(gw)))  # (B, L)
        patch_valid = patch_valid.gather(1, order)  # (B, L)
        read = patch_valid  # the patches the model reads: real and not removed
        if inputs.patch_mask is not None:
            if tuple(inputs.patch_mask.shape) != tuple(patch_valid.shape):
                raise ValueError(
                    f"patch_mask must be {tuple(patch_valid.shape)} (the batch's patch slots); "
                    f"got {tuple(inputs.patch_mask.shape)}"
                )
            read = patch_valid & inputs.patch_mask.to(patch_valid.device).bool()
        patches = embeds[:, 1:].gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
        patches = patches.masked_fill(~patch_valid[..., None], 0)  # padding drawn at random
        image_embeds = torch.cat([embeds[:, :1], patches], dim=1)  # (B, 1+L, D)
        image_mask = torch.cat([embeds_mask[:, :1], read.to(embeds_mask.dtype)], dim=1)
        cells = cells.gather(1, order[..., None].expand(-1, -1, 2))  # (B, L, 2)
        cells = cells.masked_fill(~patch_valid[..., None], -1)
        t, num_patches = inputs.ids.shape[1], patches.shape[1]
        device = inputs.ids.device
        tokens = BimodalTokens(
            text_set=JOINT,
            image_set=JOINT,
            text_positions=torch.arange(t, device=device),
            image_positions=torch.arange(t + 1, t + 1 + num_patches, device=device),
            text_valid=self._word_tokens(inputs),
            image_valid=patch_valid,
            readout_rows=torch.zeros(inputs.batch_size, dtype=torch.long, device=device),
            sizes={JOINT: t + 1 + num_patches},
            patch_cells=cells,
            grid=(int(gh), int(gw)),
        )
        kwargs = {
            "input_ids": inputs.ids,
            "attention_mask": inputs.text_mask,
            "image_embeds": image_embeds,
            "pixel_mask": image_mask,  # the (B, 1+L) token mask on this path
        }
        return kwargs, tokens

    def _remove_image(self, inputs: BimodalInputs, remove: Tensor) -> BimodalInputs:
        """Removed patch slots (``remove`` (B, L) bool) get 0 in ``patch_mask``."""
        mask = inputs.patch_mask
        if mask is None:
            mask = torch.ones(remove.shape, dtype=torch.bool, device=remove.device)
        return replace(inputs, patch_mask=mask.bool() & ~remove.to(mask.device))

    def _logits(self, kwargs: dict[str, Any]) -> Tensor:
        return self.module(**kwargs).logits
