"""Test helpers: scikit-learn's held-out 8x8 digits, converted exactly as the default model was trained.

The default model (``models/digits``, built by ``tools/train_digits.py``) trains on the
first 1,437 samples; the last 360 are held out. A pixel value ``v`` in 0..16 becomes the
uint8 pixel ``round(v * 255 / 16)``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

N_TRAIN = 1437


def held_out_digits() -> tuple[list[np.ndarray], list[int]]:
    """The 360 held-out digits as uint8 ``8x8`` arrays, and their labels (0..9)."""
    digits = load_digits()
    images = np.rint(digits.images[N_TRAIN:] * 255 / 16).astype(np.uint8)
    return list(images), [int(label) for label in digits.target[N_TRAIN:]]


def png_bytes(img: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as a grayscale (mode ``L``) PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
