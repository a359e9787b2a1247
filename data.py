"""MNIST, decoded once into memory and served as whole batches.

torchvision reads (or downloads) the four MNIST files; we then resize the whole
uint8 tensor once to the model's image size and keep it in memory. A training
batch is a single index gather into that tensor instead of 128 per-image PIL
transforms, so the input pipeline costs almost nothing next to a model step.
Pixels stay uint8 until they reach the training device, where
`to_model_range` scales them to [-1, 1].
"""
import os

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from torchvision.datasets import MNIST
from torchvision.transforms.v2 import functional as TF


MNIST_CLASSES = 10  # the digits 0-9


class DataError(RuntimeError):
    """The data set could not be read; the message says what to do."""


def load_mnist(data_dir, train=True, download=True):
    """Returns (images, labels): uint8 (N, 28, 28) and int64 (N,)."""
    try:
        dataset = MNIST(data_dir, train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError here
        raw = os.path.join(os.path.abspath(data_dir), "MNIST", "raw")
        raise DataError(
            f"could not load MNIST ({str(err).splitlines()[0]}). Without a network, put the "
            f"four uncompressed MNIST files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) in {raw}/ and pass --data_dir "
            f"{data_dir} (the folder that holds MNIST/)"
        ) from None
    return dataset.data, dataset.targets


def resize_images(images, img_size, channels=1):
    """uint8 (N, 28, 28) -> uint8 (N, channels, img_size, img_size), resized once."""
    images = images.unsqueeze(1)  # (N, 1, 28, 28)
    if images.shape[-1] != img_size:
        images = TF.resize(images, [img_size, img_size], antialias=True)
    return images.expand(-1, channels, -1, -1).contiguous()


def load_training_set(data_dir, img_size, channels=1, subset=None, download=True):
    """MNIST training images ready for the model: uint8 (N, C, S, S) and labels (N,)."""
    images, labels = load_mnist(data_dir, train=True, download=download)
    if subset:
        images, labels = images[:subset], labels[:subset]
    return resize_images(images, img_size, channels), labels


def to_model_range(images, device):
    """uint8 [0, 255] -> float32 [-1, 1] on `device` (x = 2 * p / 255 - 1)."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


class _IndexedBatches(Dataset):
    """dataset[list_of_indices] returns a whole batch with one gather."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, indices):
        indices = torch.as_tensor(indices)
        return self.images[indices], self.labels[indices]


def make_loader(images, labels, batch_size, seed, rank=0, world_size=1, num_workers=0,
                pin_memory=False):
    """Shuffled batches of (uint8 images, labels), the same order for the same seed.

    A DistributedSampler serves one process as well as many: with world_size 1 it is a
    seeded permutation per epoch (call `loader.sampler.sampler.set_epoch(epoch)`), and
    under DDP each rank reads its own 1/world_size share of that permutation.
    """
    sampler = DistributedSampler(_IndexedBatches(images, labels), num_replicas=world_size,
                                 rank=rank, shuffle=True, seed=seed)
    return DataLoader(_IndexedBatches(images, labels),
                      sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      # its own generator: a new epoch's iterator then draws its worker seed
                      # from here, not from the global stream that noise and timesteps use
                      generator=torch.Generator().manual_seed(seed))
