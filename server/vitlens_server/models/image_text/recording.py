"""One recorded forward pass of both towers, then backward passes of chosen similarity logits.

`capture` encodes a batch of images and a batch of texts with both towers recording and scores
them; `ImageTextCapture.gradients` is one backward pass: ∂y/∂O_l of every layer of both towers
for y = Σ_p w_p · logits[image_p, text_p], returned as a new recording. Each tower encodes its
items independently, so an item's gradients are its own as long as it appears in one chosen
pair; an item in several pairs receives the sum. `record_pairs` is the exact per-pair form: P
images and P texts, y_p = logits[p, p], one backward pass for all P pairs.

The graph starts at the first attention output of each tower (the weights never require grad),
and ``torch.autograd.grad`` never touches parameter ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.models.image_text.base import ImageTextModel
from vitlens_server.models.image_text.records import ImageTextRecording
from vitlens_server.models.image_text.tokenizer import TokenizedTexts

__all__ = ["ImageTextCapture", "capture", "record_pairs"]


@dataclass(frozen=True)
class ImageTextCapture:
    """One forward pass of both towers under the recording hooks.

    Attributes:
        recording: both towers' attention (without gradients).
        image_embeds: (B, D) unit image embeddings.
        text_embeds: (M, D) unit text embeddings.
        logits: (B, M) similarity logits, in the graph when captured with ``gradients=True``.
    """

    recording: ImageTextRecording
    image_embeds: Tensor
    text_embeds: Tensor
    logits: Tensor

    def gradients(
        self,
        image_index: Tensor,
        text_index: Tensor,
        weight: Tensor | None = None,
        *,
        retain: bool = False,
    ) -> ImageTextRecording:
        """Both towers' recordings with ∂y/∂O_l for y = Σ_p weight_p · logits[image_p, text_p].

        Args:
            image_index, text_index: (P,) the chosen pairs.
            weight: (P,) weight of each pair's logit; None: 1.
            retain: keep the graph for a further call (False frees it).
        """
        if not self.logits.requires_grad:
            raise RuntimeError("this capture has no graph: capture(..., gradients=True)")
        device = self.logits.device
        chosen = self.logits[image_index.to(device), text_index.to(device)]  # (P,)
        if weight is not None:
            chosen = chosen * weight.to(chosen)
        images, texts = self.recording.towers()
        outs = images.attention_outputs() + texts.attention_outputs()
        grads = torch.autograd.grad(chosen.sum(), outs, retain_graph=retain, allow_unused=True)
        split = images.num_layers
        return ImageTextRecording(
            images.with_gradients(grads[:split]), texts.with_gradients(grads[split:])
        )


def capture(
    model: ImageTextModel,
    pixels: Tensor,
    texts: TokenizedTexts,
    *,
    gradients: bool = True,
    text_inputs: bool = False,
    lrp: bool = False,
) -> ImageTextCapture:
    """Encode ``pixels`` and ``texts`` with both towers recording, and score every pair.

    Args:
        model: the adapter.
        pixels: (B, 3, H, W) normalised images (`Preprocess.normalise`).
        texts: M tokenized texts (`ImageTextModel.tokenize`).
        gradients: build the graph for `ImageTextCapture.gradients`; otherwise no graph.
        text_inputs: also record the text tower's token embeddings (M, L, D), in the graph, for
            ∂y/∂embeddings (`TowerRecording.inputs`).
        lrp: also record both towers' LRP activations (`TowerRecording.blocks`).
    """
    if gradients and torch.is_inference_mode_enabled():
        raise RuntimeError("capture(gradients=True) cannot run under torch.inference_mode()")
    with model.record(text_inputs=text_inputs, lrp=lrp) as rec, torch.set_grad_enabled(gradients):
        image_embeds = model.encode_images(pixels)  # (B, D)
        text_embeds = model.encode_texts(texts)  # (M, D)
        logits = model.similarity(image_embeds, text_embeds)  # (B, M)
    return ImageTextCapture(rec, image_embeds, text_embeds, logits)


def record_pairs(
    model: ImageTextModel, pixels: Tensor, texts: TokenizedTexts
) -> tuple[ImageTextRecording, Tensor]:
    """Both towers' recordings with the gradients of each pair's own logit, y_p = logits[p, p].

    Args:
        pixels: (P, 3, H, W) normalised images; texts: P tokenized texts, text p with image p.

    Returns:
        The recording (gradients set) and the (P,) logits of the pairs.
    """
    if len(texts) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(texts)} texts: pairs need one each")
    captured = capture(model, pixels, texts)
    pairs = torch.arange(len(pixels), device=captured.logits.device)
    recording = captured.gradients(pairs, pairs)
    return recording, captured.logits.detach().diagonal()
