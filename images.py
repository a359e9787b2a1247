"""Turning model outputs in [-1, 1] into image files."""
import os
import tempfile

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


def check_output_dir(path):
    """Fail early, before any work, unless files can be written in directory `path`.

    `path` need not exist yet (the first write creates it), and nothing is created now: a
    scratch file is written and removed in `path`, or in its nearest existing parent when it
    does not exist. A real write, because os.access says yes to root even on a read-only
    mount."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"cannot write files in the output directory {path}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputError(f"cannot write files in the output directory {path}: "
                          f"{err.strerror or err}") from None


def check_output_file(path, missing_folder_ok=False):
    """Fail early, before any work, when the file `path` cannot be written. Its folder must
    exist unless missing_folder_ok (then the writer creates it)."""
    if os.path.isdir(path):
        raise OutputError(f"output is a directory, expected a file path: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if not missing_folder_ok and not os.path.isdir(parent):
        raise OutputError(f"output folder does not exist: {parent}")
    check_output_dir(parent)


def check_output(path):
    """Fail early, before any sampling, when the image output `path` cannot be written."""
    if is_directory_output(path):
        check_output_dir(path)
        return
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise OutputError(f"cannot tell the image format of {path!r} from its extension "
                          "(use .png, .jpg, ... or end the path with / for a directory)")
    check_output_file(path)


def _to_image(pixels):
    """uint8 (C, H, W) -> a grayscale (C = 1) or RGB PIL image."""
    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3])


def _save_array(pixels, path):
    """pixels: uint8 (C, H, W) -> a grayscale or RGB file whose format follows the extension."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _to_image(pixels).save(path)


def grid_pixels(x, nrow=8, padding=2, scale=1):
    """All samples of (B, C, H, W) in one uint8 picture (1 or C, H', W'), `nrow` per row,
    then each pixel repeated scale x scale times: a nearest-neighbour magnification, so that a
    28-pixel digit can be seen on a screen without blurring it into something the model did
    not draw."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    padding = 0 if len(x) == 1 else padding  # a single sample keeps its exact size
    pixels = make_grid(to_uint8(x), nrow=nrow, padding=padding, pad_value=0)
    if x.shape[1] == 1:
        pixels = pixels[:1]  # make_grid repeats a single channel three times
    return pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def save_grid(x, path, nrow=8, padding=2, scale=1):
    """All samples of (B, C, H, W) in one picture, `nrow` per row, magnified `scale` times."""
    _save_array(grid_pixels(x, nrow, padding, scale), path)


def save_gif(frames, path, nrow=8, padding=2, scale=1, frame_ms=100, last_ms=2000):
    """An animated GIF that loops: one frame per (B, C, H, W) batch of `frames`, each laid out
    as save_grid lays it out, shown frame_ms milliseconds, the last one last_ms.

    Grayscale frames are stored exactly (GIF's 256-entry palette holds every gray); colour
    ones are reduced to 256 colours. The GIF writer merges a frame identical to the one
    before it into that one (their times add up), so the file can hold fewer frames."""
    images = [_to_image(grid_pixels(x, nrow, padding, scale)) for x in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    durations = [frame_ms] * (len(images) - 1) + [last_ms]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def save_images(x, directory, names):
    """One PNG per sample: directory/<name>.png."""
    for pixels, name in zip(to_uint8(x), names):
        _save_array(pixels, os.path.join(directory, f"{name}.png"))


def sample_names(count, prefix=""):
    """File names (no extension) for `count` samples: prefix + 000, 001, ...; wider numbers
    once there are more than 1000 samples, so that the names sort in sample order."""
    width = max(3, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def save_samples(x, output, names, nrow, scale=1):
    """A grid (or a single image) at `output`, magnified `scale` times, or one file per sample
    at the model's size when `output` is a directory (data for other programs)."""
    if is_directory_output(output):
        save_images(x, output, names)
    else:
        save_grid(x, output, nrow=nrow, scale=scale)
