"""Reading images and masks from disk, with every mode converted to what the model expects."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcad.core.data.records import IMAGE_EXTENSIONS
from dcad.core.errors import DatasetError, first_line

__all__ = ["IMAGE_EXTENSIONS", "load_image", "load_mask", "save_png"]


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode a file; any failure becomes a one-line DatasetError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's DecompressionBombWarning, EXIF warnings
            with Image.open(path) as img:
                img.load()
                return img.copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: unreadable {what} (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable or truncated {what} ({first_line(err)})") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any integer or float array to uint8 by its type's range (16-bit: /257; float: [0,1] or [0,255])."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    peak = int(arr.max(initial=0))
    if peak <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    top = 65535 if peak <= 65535 else peak
    return np.clip(arr.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """uint8 H×W×3 RGB; grey, grey+alpha, RGBA (alpha dropped), palette, CMYK and 16-bit are converted."""
    path = Path(path)
    img = _open(path, "image")
    if img.mode in ("RGB", "RGBA", "LA", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA", "RGBX"):
        rgb = np.asarray(img.convert("RGB"))
    else:  # 16/32-bit integer and float greyscale ("I;16", "I", "F", ...)
        grey = _to_uint8(np.asarray(img))
        if grey.ndim == 3:
            grey = grey[..., 0]
        rgb = np.repeat(grey[..., None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DatasetError(f"{path}: unsupported image shape {rgb.shape}")
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)  # writable (PIL arrays are read-only)


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """bool H×W, True where any channel is > 0; DatasetError if `shape` is given and differs."""
    path = Path(path)
    img = _open(path, "mask")
    if img.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F", "RGB"):
        img = img.convert("RGB")  # palette, alpha and other colour modes: alpha is not a mask value
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise DatasetError(f"{path}: unsupported mask shape {arr.shape}")
    mask = arr > 0
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise DatasetError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match image size {shape[1]}x{shape[0]}"
        )
    return mask


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H×W or H×W×3) or bool array as a PNG with fixed options, so bytes are reproducible."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", optimize=False, compress_level=6)
