import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">II", magic, array.shape[0]))
        if array.ndim == 3:
            f.write(struct.pack(">II", *array.shape[1:]))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data_dir in torchvision's MNIST layout with 96 train / 32 test synthetic digits:
    a bright bar whose position encodes the label, so a model can learn something."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 32)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 30, size=(n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 4 + 2 * label: 6 + 2 * label, 4:24] = 255
        write_idx(raw / f"{split}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, 2049)
    return str(root)


def run_script(*args, check=True, env=None):
    """Run a repo script with the current python; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env=full_env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


TINY_MODEL = ["--dim", "32", "--depth", "2", "--heads", "2"]


def ref_alphas_cumprod(schedule, T=1000, beta_start=1e-4, beta_end=0.02):
    """float64 numpy (betas, alpha bar) of the two schedules, written from the papers (Ho et
    al. 2020: linear betas; Nichol & Dhariwal 2021 eq. 17: cosine), not from scheduler.py."""
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T)
    else:
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(T)
        betas = np.minimum(1 - f(t + 1) / f(t), 0.999)
    return betas, np.cumprod(1 - betas)


def perturbed(model, std=0.05, seed=0):
    """`model` with N(0, std^2) added to every parameter, in place, so that the zero-initialised
    layers (adaLN, output, cross-attention projections) pass signal and the output depends on
    every input; returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()
