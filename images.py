"""Turning model outputs in [-1, 1] into image files."""
import os

import torch
from PIL import Image
from torchvision.utils import make_grid


class OutputError(ValueError):
    """An output path that cannot be written; the message says why in one line."""


def to_uint8(x):
    """(B, C, H, W) float in [-1, 1] -> uint8 pixels clamp((x + 1) / 2, 0, 1) * 255 (no stretching)."""
    return ((x.float().cpu() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def is_directory_output(path):
    return path.endswith(("/", os.sep)) or os.path.isdir(path)


def check_output(path):
    """Fail early, before any sampling, when `path` cannot be written."""
    if is_directory_output(path):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise OutputError(f"output directory is not writable: {path}")
        return
    parent = os.path.dirname(os.path.abspath(path))
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise OutputError(f"cannot tell the image format of {path!r} from its extension "
                          "(use .png, .jpg, ... or end the path with / for a directory)")
    if not os.path.isdir(parent):
        raise OutputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder is not writable: {parent}")


def _save_array(pixels, path):
    """pixels: uint8 (C, H, W) -> a grayscale or RGB file whose format follows the extension."""
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3])
    image.save(path)


def save_grid(x, path, nrow=8, padding=2):
    """All samples of (B, C, H, W) in one picture, `nrow` per row."""
    padding = 0 if len(x) == 1 else padding  # a single sample keeps its exact size
    pixels = make_grid(to_uint8(x), nrow=nrow, padding=padding, pad_value=0)
    if x.shape[1] == 1:
        pixels = pixels[:1]  # make_grid repeats a single channel three times
    _save_array(pixels, path)


def save_images(x, directory, names):
    """One PNG per sample: directory/<name>.png."""
    os.makedirs(directory, exist_ok=True)
    for pixels, name in zip(to_uint8(x), names):
        _save_array(pixels, os.path.join(directory, f"{name}.png"))


def save_samples(x, output, names, nrow):
    """A grid (or a single image) at `output`, or one file per sample when it is a directory."""
    if is_directory_output(output):
        save_images(x, output, names)
    else:
        save_grid(x, output, nrow=nrow)
