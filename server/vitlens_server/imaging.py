"""Decode and validate request images into model-ready pixel tensors.

Every image is checked before any of them is queued: undecodable bytes, bad pixel arrays and
oversized images (a decompression-bomb guard) raise `InvalidArgument` naming the image as the
request does (`ImageInput.where`). Images are resized to the model's input size without
cropping, so maps cover the whole image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from vitlens_server.config import DEFAULT_MAX_PIXELS
from vitlens_server.domain import ImageInput
from vitlens_server.errors import InvalidArgument, about, clip

__all__ = ["ImageDecoder", "normalise_pixels", "resize_pixels"]


@dataclass(frozen=True)
class ImageDecoder:
    """Turns `ImageInput`s into a (B, 3, H, W) float32 batch in [0, 1] at ``size``."""

    size: tuple[int, int]  # (H, W) model input
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([self.decode(image) for image in images])

    def decode(self, image: ImageInput) -> torch.Tensor:
        """One image → (3, H, W) float32 in [0, 1] at the model's input size."""
        return resize_pixels(self.read(image), self.size)

    def read(self, image: ImageInput) -> torch.Tensor:
        """One image at its own size: (3, h, w) uint8, or float32 in [0, 1]."""
        where = image.where + (f" ({clip(image.id, 64)})" if image.id else "")
        if image.pixels is not None:
            with about(f"{image.where}.pixels"):
                return self._decode_array(image.pixels, where)
        if image.encoded is not None:
            with about(f"{image.where}.encoded"):
                return self._decode_bytes(image.encoded, where)
        raise InvalidArgument(
            f"{where} is empty: set `encoded` bytes or a `pixels` tensor", field=image.where
        )

    def _check_size(self, height: int, width: int, where: str) -> None:
        if height * width > self.max_pixels:
            raise InvalidArgument(
                f"{where} has {width}x{height} = {height * width:,} pixels, above this server's "
                f"limit of {self.max_pixels:,}; downscale it before sending"
            )

    def _decode_bytes(self, data: bytes, where: str) -> torch.Tensor:
        if not data:
            raise InvalidArgument(f"{where}: `encoded` holds no bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                img = PILImage.open(io.BytesIO(data))
                self._check_size(img.height, img.width, where)  # before any pixel is decoded
                rgb = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        except InvalidArgument:
            raise
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as err:
            raise InvalidArgument(f"{where} is too large to decode safely: {err}") from err
        except PILImage.UnidentifiedImageError as err:
            raise InvalidArgument(
                f"{where}: the {len(data)} `encoded` bytes are not an image format this server "
                "reads; send PNG, JPEG, WebP, BMP or TIFF, or a `pixels` tensor"
            ) from err
        except Exception as err:  # Pillow raises many types for truncated or corrupt files
            raise InvalidArgument(
                f"{where}: the image is corrupt or truncated ({type(err).__name__}: {err})"
            ) from err
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W) uint8

    def _decode_array(self, array: np.ndarray, where: str) -> torch.Tensor:
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3):
            raise InvalidArgument(
                f"{where}.pixels has shape {tuple(array.shape)}; expected (H, W), (H, W, 1) or "
                "(H, W, 3) (channels last, RGB)"
            )
        height, width, _ = array.shape
        if height == 0 or width == 0:
            raise InvalidArgument(f"{where}.pixels is empty (shape {tuple(array.shape)})")
        self._check_size(height, width, where)
        if array.dtype == np.uint8:
            pixels = torch.from_numpy(array.copy())
        else:
            pixels = torch.from_numpy(array.astype(np.float32))
            if not torch.isfinite(pixels).all():
                raise InvalidArgument(f"{where}.pixels holds NaN or infinite values")
            low, high = pixels.min().item(), pixels.max().item()
            if low < 0 or high > 1:
                raise InvalidArgument(
                    f"{where}.pixels are floats in [{low:.3g}, {high:.3g}]; float pixels must "
                    "lie in [0, 1] (send uint8 for 0..255)"
                )
        return pixels.permute(2, 0, 1).expand(3, -1, -1)


def normalise_pixels(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """(B, 3, H, W) pixels in [0, 1] → (pixels − mean) / std per channel, in their dtype."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device)
    return (pixels - mean_t[:, None, None]) / std_t[:, None, None]


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 or float → (3, H, W) float32 in [0, 1] at ``size`` (bicubic, antialiased).

    uint8 images are resized before conversion, so a large upload never exists as floats.
    """
    if tuple(pixels.shape[1:]) != tuple(size):
        pixels = F.interpolate(
            pixels[None], size=size, mode="bicubic", align_corners=False, antialias=True
        )[0]
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(255)
    return pixels.clamp(0, 1).contiguous()
