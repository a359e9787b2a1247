import os

import pytest
import torch

from data import DataError, load_mnist, load_training_set, make_loader, to_model_range
from tests.conftest import ROOT

REAL_MNIST = os.path.join(ROOT, "data")


def test_tiny_mnist_loads_resized_and_scaled(tiny_mnist):
    images, labels = load_training_set(tiny_mnist, img_size=32, subset=40)
    assert images.shape == (40, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(labels, torch.arange(40) % 10)
    x = to_model_range(images, "cpu")
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9  # 255 -> 1
    assert torch.allclose(to_model_range(torch.tensor([0, 255], dtype=torch.uint8), "cpu"),
                          torch.tensor([-1.0, 1.0]))


def test_missing_data_gives_one_line_error(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(str(tmp_path / "nothing"), download=False)
    message = str(err.value)
    assert "\n" not in message and "MNIST/raw" in message and "--data_dir" in message


def test_loader_covers_the_set_once_per_epoch_and_reshuffles(tiny_mnist):
    images, labels = load_training_set(tiny_mnist, img_size=28)
    ids = torch.arange(len(images))  # use labels as a carrier of the index
    loader = make_loader(images, ids, batch_size=10, seed=0)
    loader.sampler.sampler.set_epoch(0)
    epoch0 = torch.cat([y for _, y in loader])
    assert sorted(epoch0.tolist()) == list(range(len(images)))
    loader.sampler.sampler.set_epoch(1)
    epoch1 = torch.cat([y for _, y in loader])
    assert not torch.equal(epoch0, epoch1)
    # images and labels stay paired
    x, y = next(iter(loader))
    assert torch.equal(x, images[y])


def test_two_ranks_split_the_epoch(tiny_mnist):
    images, labels = load_training_set(tiny_mnist, img_size=28)
    ids = torch.arange(len(images))
    seen = []
    for rank in range(2):
        loader = make_loader(images, ids, batch_size=8, seed=3, rank=rank, world_size=2)
        loader.sampler.sampler.set_epoch(0)
        seen.append(torch.cat([y for _, y in loader]))
    assert len(seen[0]) == len(seen[1]) == len(images) // 2
    assert sorted(torch.cat(seen).tolist()) == list(range(len(images)))


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_MNIST, "MNIST", "raw")),
                    reason="real MNIST not laid out in ./data (.ci/run does it)")
def test_real_mnist_layout():
    images, labels = load_mnist(REAL_MNIST, download=False)
    assert images.shape == (60000, 28, 28)
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                               5851, 5949]
