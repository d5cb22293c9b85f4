"""Images -> model inputs (docs/architecture.md §4): smart resize to multiples of 28, bicubic, CLIP normalisation, 2x2
block-major patches of 3*14*14 values, and the grid each image occupies."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .media import MAX_IMAGE_PIXELS, MediaInput, describe, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size closest to (height, width) with both sides multiples of `factor` and area within the limits."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the 200:1 limit")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(chw: np.ndarray, patch: int, merge: int) -> np.ndarray:
    """[C, H, W] -> [H/p * W/p, C*p*p], the patches of each merge x merge window consecutive."""
    c, h, w = chw.shape
    gh, gw = h // patch, w // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    return x.transpose(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, c * patch * patch)


@dataclass
class ImageProcessor:
    """Turns images into ``pixel_values [N, 3*14*14]`` and ``image_grid_thw [n, 3]``."""

    min_pixels: int = 56 * 56
    max_pixels: int = 6177 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_input_pixels: int = MAX_IMAGE_PIXELS  # larger inputs are refused from their header (`ernie45 serve` lowers it)

    def resize(self, img: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(img.height, img.width, factor, min_pixels or self.min_pixels, max_pixels or self.max_pixels)
        return img.resize((w, h), Image.Resampling.BICUBIC)

    def normalize(self, img: Image.Image) -> np.ndarray:
        """uint8 RGB -> float32 CHW, rescaled by 1/255 and CLIP-normalised."""
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return x.transpose(2, 0, 1)

    def frame_patches(self, img: Image.Image) -> tuple[np.ndarray, int, int]:
        x = self.normalize(img)
        return (
            patchify(x, self.patch_size, self.merge_size),
            x.shape[1] // self.patch_size,
            x.shape[2] // self.patch_size,
        )

    def __call__(self, images: list[MediaInput] | MediaInput) -> dict[str, torch.Tensor]:
        images = images if isinstance(images, list) else [images]
        patches, grids = [], []
        for source in images:
            img = load_image(source, self.max_input_pixels, self.max_pixels)
            try:
                p, gh, gw = self.frame_patches(self.resize(img))
            except ValueError as e:
                raise ValueError(f"{describe(source)}: {e}") from None
            patches.append(p)
            grids.append([1, gh, gw])
        return {
            "pixel_values": torch.from_numpy(np.concatenate(patches)),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }

    def num_tokens(self, grid_thw: list[int]) -> int:
        """Placeholder tokens an image of this grid takes in the prompt."""
        return grid_thw[0] * grid_thw[1] * grid_thw[2] // self.merge_size**2
