"""CLIP's byte-level BPE, from open_clip's bundled vocabulary or a Hugging Face tokenizer.

Both tokenizers return `TokenizedTexts`: ids padded to the model's context length, which
positions are the text's own (start, pieces, end) and which are padding, and a readable string
per position (a BPE piece decoded from its byte-level alphabet, without the ``</w>`` word-end
mark; special tokens as they are named). The pooled index is the model's, set by the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["BpeTokenizer", "HfBpeTokenizer", "OpenClipBpeTokenizer", "TokenizedTexts", "readable"]

WORD_END = "</w>"


@dataclass(frozen=True)
class TokenizedTexts:
    """Texts as a tower reads them.

    Attributes:
        texts: the texts, as given.
        ids: (M, L) int64 token ids, L the model's context length.
        valid: (M, L) bool, True at the text's own tokens (start, pieces, end), False at padding.
        tokens: per text, one readable string per valid position (``len == valid[m].sum()``).
        pooled_index: (M,) int64, the position the text embedding is read at (the end-of-text
            token for OpenAI-style CLIP).
    """

    texts: tuple[str, ...]
    ids: Tensor
    valid: Tensor
    tokens: tuple[tuple[str, ...], ...]
    pooled_index: Tensor

    def __len__(self) -> int:
        return len(self.texts)

    def narrow(self, rows: slice) -> TokenizedTexts:
        """The texts ``rows``."""
        return TokenizedTexts(
            self.texts[rows],
            self.ids[rows],
            self.valid[rows],
            self.tokens[rows],
            self.pooled_index[rows],
        )

    def to(self, device: torch.device | str) -> TokenizedTexts:
        return TokenizedTexts(
            self.texts,
            self.ids.to(device),
            self.valid.to(device),
            self.tokens,
            self.pooled_index.to(device),
        )


class BpeTokenizer:
    """Texts → (ids, valid, readable tokens); subclasses wrap one library's tokenizer."""

    context_length: int

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, tuple[tuple[str, ...], ...]]:
        """(M, L) ids, (M, L) valid mask, readable tokens of the valid positions."""
        raise NotImplementedError

    def count(self, text: str) -> int:
        """Tokens ``text`` takes in the context, start and end tokens included (untruncated)."""
        raise NotImplementedError


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from open_clip.tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}


def readable(piece: str, special: frozenset[str] = frozenset()) -> str:
    """A byte-level BPE piece as text: ``'photo</w>'`` → ``'photo'``; specials unchanged."""
    if piece in special:
        return piece
    piece = piece.removesuffix(WORD_END)
    decoder = _byte_decoder()
    if not all(ch in decoder for ch in piece):
        return piece
    return bytes(decoder[ch] for ch in piece).decode("utf-8", errors="replace")


class OpenClipBpeTokenizer(BpeTokenizer):
    """open_clip's ``SimpleTokenizer`` (the OpenAI CLIP BPE bundled with open_clip)."""

    def __init__(self, context_length: int, **tokenizer_kwargs) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = int(context_length)
        self.library = SimpleTokenizer(context_length=self.context_length, **tokenizer_kwargs)
        self._special = frozenset(self.library.decoder[i] for i in self.library.all_special_ids)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, tuple[tuple[str, ...], ...]]:
        ids = self.library(list(texts), context_length=self.context_length)  # (M, L)
        eot = self.library.eot_token_id
        # Padding is id 0 (a real piece, '!'): a text's own tokens end at its first EOT.
        end = (ids == eot).int().argmax(dim=-1)  # (M,)
        valid = torch.arange(ids.shape[1])[None, :] <= end[:, None]
        tokens = tuple(
            tuple(readable(self.library.decoder[int(i)], self._special) for i in row[ok])
            for row, ok in zip(ids, valid, strict=True)
        )
        return ids, valid, tokens

    def count(self, text: str) -> int:
        return len(self.library.encode(text)) + 2  # + start and end of text


class HfBpeTokenizer(BpeTokenizer):
    """A transformers ``CLIPTokenizer`` loaded from a local directory."""

    def __init__(self, library, context_length: int) -> None:
        self.library = library
        self.context_length = int(context_length)
        self._special = frozenset(str(t) for t in library.all_special_tokens)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, tuple[tuple[str, ...], ...]]:
        enc = self.library(
            list(texts),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, valid = enc["input_ids"].long(), enc["attention_mask"].bool()
        tokens = tuple(
            tuple(
                readable(piece, self._special)
                for piece in self.library.convert_ids_to_tokens(row[ok].tolist())
            )
            for row, ok in zip(ids, valid, strict=True)
        )
        return ids, valid, tokens

    def count(self, text: str) -> int:
        return len(self.library(text, truncation=False, add_special_tokens=True)["input_ids"])
