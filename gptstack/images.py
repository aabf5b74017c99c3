"""Pictures in: a file, bytes or a Pillow image as the (3, S, S) uint8 tensor the model's image encoder reads,
scaled to its size (S × S). Used by the vision stage, `sample --image`, chat's /image and the server."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import GptstackError

MAX_PIXELS = 4096 * 4096  # a larger picture is refused before it is decoded (a decompression bomb)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB picture scaled to size × size (BICUBIC; a picture of that size as it is), as (3, size, size) uint8."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_image(source: str | Path | bytes, size: int, where: str | None = None) -> torch.Tensor:
    """A picture file (PNG, JPEG, ... anything Pillow reads) or its bytes, as `image_tensor`; a file that is no
    picture is an error naming it (`where`, or the path)."""
    name = where or (str(source) if not isinstance(source, bytes) else "image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise GptstackError(f"{name}: a picture of {image.width}×{image.height} pixels is too large")
            return image_tensor(image, size)
    except FileNotFoundError:
        raise GptstackError(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise GptstackError(f"{name}: not a picture Pillow can read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
