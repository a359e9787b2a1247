"""images.py: nearest-neighbour magnification of saved grids."""
import numpy as np
import pytest
import torch
from PIL import Image

from images import save_grid


@pytest.mark.parametrize("channels", [1, 3])
def test_scaled_grid_repeats_every_pixel(channels, tmp_path):
    x = torch.rand(5, channels, 6, 7) * 2 - 1  # 5 samples: 3 in the first row, 2 in the second
    save_grid(x, tmp_path / "one.png", nrow=3, scale=1)
    save_grid(x, tmp_path / "three.png", nrow=3, scale=3)
    one = np.array(Image.open(tmp_path / "one.png"))
    three = np.array(Image.open(tmp_path / "three.png"))
    assert one.shape[:2] == (2 + 2 * (6 + 2), 2 + 3 * (7 + 2))  # padding 2 around each sample
    # each pixel of the 1x grid, padding included, becomes a 3 x 3 block
    np.testing.assert_array_equal(three, one.repeat(3, axis=0).repeat(3, axis=1))


def test_grid_default_scale_keeps_the_model_size(tmp_path):
    """infer.py's outputs rely on save_grid writing samples at their own size unless told."""
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    save_grid(x, tmp_path / "default.png")
    assert Image.open(tmp_path / "default.png").size == (16, 16)


@pytest.mark.parametrize("scale", [0, -2, 1.5, True])
def test_grid_refuses_a_scale_that_is_not_a_positive_integer(scale, tmp_path):
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "x.png", scale=scale)
    assert not (tmp_path / "x.png").exists()
