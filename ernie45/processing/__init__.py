"""Inputs for the model: media readers, image and video processors, placeholder expansion.

(The tokenizer and chat templates join this package with the chat issue.)
"""

from .image import ImageProcessor, smart_resize
from .media import load_image
from .placeholders import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, expand_ids, expand_text
from .video import VideoProcessor

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "ImageProcessor",
    "VideoProcessor",
    "expand_ids",
    "expand_text",
    "load_image",
    "smart_resize",
]
