"""Tests for evaluate.py: the Frechet distance against closed forms, the classifier on a
tiny subset, the command line's error handling, and one end-to-end run."""
import json
import os

import numpy as np
import pytest
import torch

import evaluate
from cli import run_main
from data import DataError, load_mnist
from evaluate import (classify, feature_statistics, frechet_distance, load_classifier,
                      samples_to_classifier_input, save_classifier, train_classifier)
from sampling import DEFAULT_GUIDANCE_SCALE
from tests.conftest import ROOT, run_script

DATA_DIR = os.path.join(ROOT, "data")


def _mnist_or_none():
    try:
        return load_mnist(DATA_DIR, train=True, download=False)
    except DataError:
        return None


MNIST = _mnist_or_none()


def _random_spd(rng, n):
    a = rng.standard_normal((n, 2 * n))
    return a @ a.T / (2 * n) + 0.1 * np.eye(n)


# ----------------------------------------------------------------------------- Frechet distance


def test_identical_gaussians_have_zero_distance():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), _random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_mean_shift_only():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(8), rng.standard_normal(8), _random_spd(rng, 8)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_diagonal_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_commuting_non_diagonal_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T share eigenvectors, so (S1 S2)^(1/2) =
    # Q diag(sqrt(a b)) Q^T and d^2 = ||dmu||^2 + sum(a + b - 2 sqrt(a b)).
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a, b = rng.uniform(0.05, 4, 12), rng.uniform(0.05, 4, 12)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_symmetric_and_handles_singular_covariances():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 20))  # 5 points in 20-d: a rank-4 covariance
    y = rng.standard_normal((300, 20))
    s1, s2 = feature_statistics(x), feature_statistics(y)
    d12, d21 = frechet_distance(*s1, *s2), frechet_distance(*s2, *s1)
    assert np.isfinite(d12) and d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-8)


def test_feature_statistics_match_numpy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 7)) * rng.uniform(0.5, 2, 7) + rng.standard_normal(7)
    mu, sigma = feature_statistics(torch.from_numpy(x).float())
    assert mu.dtype == np.float64 and mu.shape == (7,) and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- classifier


def _synthetic_digits(n, seed):
    """Ten separable 'digits': class k is a bright 8x8 square at its own place on a noisy canvas."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = 2 + 9 * (k // 4), 2 + 6 * (k % 4)
        images[i, r:r + 8, c:c + 8] = 255
    return images, labels


def _small_training_set():
    if MNIST is not None:
        images, labels = MNIST
        return images[:512], labels[:512], images[-512:], labels[-512:]
    train, test = _synthetic_digits(512, 0), _synthetic_digits(512, 1)
    return (*train, *test)


def test_train_classifier_on_a_tiny_subset(tmp_path):
    images, labels, held_images, held_labels = _small_training_set()
    model, acc = train_classifier(images, labels, held_images, held_labels, epochs=10,
                                  batch_size=64, max_steps=40, progress=False)
    logits, features = classify(model, held_images)
    assert logits.shape == (512, 10) and features.shape == (512, 128)
    assert acc == pytest.approx((logits.argmax(1) == held_labels).float().mean().item())
    assert acc > 0.3, f"held-out accuracy {acc:.3f} is no better than chance"

    path = tmp_path / "classifier.pt"
    save_classifier(model, acc, str(path))
    loaded, loaded_acc = load_classifier(str(path))
    assert loaded_acc == pytest.approx(acc)
    torch.testing.assert_close(classify(loaded, held_images[:32])[0], logits[:32])


def test_samples_are_mapped_like_training_images():
    # A uint8 image mapped to [-1, 1] (as the diffusion models see it), made 3-channel and
    # 32x32, comes back as the 28x28 [0, 1] pixels the classifier was trained on.
    images, _ = _synthetic_digits(4, 2)
    model_range = images.float().div(127.5).sub(1).unsqueeze(1)  # (4, 1, 28, 28)
    out = samples_to_classifier_input(model_range.expand(-1, 3, -1, -1))
    torch.testing.assert_close(out, images.unsqueeze(1).float() / 255)
    upsampled = torch.nn.functional.interpolate(model_range, size=32, mode="bilinear")
    big = samples_to_classifier_input(upsampled)
    assert big.shape == (4, 1, 28, 28) and 0 <= big.min() and big.max() <= 1


# ----------------------------------------------------------------------------- command line


def _error_line(capsys, args):
    """Run evaluate.py's main as `python evaluate.py` would; return its one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(args))  # anything but SystemExit would fail the test
    code = exit_info.value.code
    if isinstance(code, str):  # sys.exit("error: ...")
        return code
    assert code == 2  # argparse's parser.error printed usage and the error to stderr
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing.pt", "--guidance_sweep", "1,a"], "--guidance_sweep"),
    (["--ckpt", "missing.pt", "--num_samples", "0"], "positive"),
    (["--num_samples", "10"], "--ckpt is required"),
    (["--ckpt", "no/such/checkpoint.pt"], "not found"),
])
def test_invalid_input_is_a_one_line_error(capsys, args, message):
    line = _error_line(capsys, args)
    assert "error" in line and message in line and "\n" not in line


def test_end_to_end_on_a_tiny_checkpoint(tiny_mnist, tmp_path, capsys):
    ckpt, classifier, out = (tmp_path / f for f in ("ckpt_final.pt", "classifier.pt", "r.json"))
    run_script("train_cfg.py", "--data_dir", tiny_mnist, "--subset", "64", "--max_steps", "2",
               "--batch_size", "16", "--dim", "32", "--depth", "1", "--heads", "2",
               "--save_dir", str(tmp_path))

    # A quick, weak classifier: this test checks the plumbing, not the scores.
    images, labels = load_mnist(tiny_mnist, train=True, download=False)
    model, acc = train_classifier(images, labels, images, labels, batch_size=32, max_steps=4,
                                  progress=False)
    save_classifier(model, acc, str(classifier))

    # Checked once the checkpoint says it is model B, before any classifier or sampling work.
    assert "multiple of 10" in _error_line(capsys, ["--ckpt", str(ckpt), "--num_samples", "25"])
    for option in ("--guidance_max_snr", "--guidance_min_snr"):
        message = _error_line(capsys, ["--ckpt", str(ckpt), option, "4"])
        assert f"{option} sets where model A's autoguidance acts" in message and "holds model B" in message

    run_script("evaluate.py", "--ckpt", str(ckpt), "--num_samples", "20", "--sampler", "ddim",
               "--steps", "2", "--device", "cpu", "--data_dir", tiny_mnist,
               "--classifier", str(classifier), "--json", str(out))
    report = json.loads(out.read_text())
    assert report["kind"] == "class_conditional" and report["num_samples"] == 20 and report["steps"] == 2
    assert report["classifier"] == {"path": str(classifier), "test_acc": acc}
    assert report["real_floor"]["num_images"] == 20 and report["real_floor"]["fid"] >= 0
    [row] = report["results"]
    assert row["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    for key in ("sampling_seconds", "accuracy", "per_digit_accuracy", "confidence",
                "class_histogram", "class_entropy_bits", "fid"):
        assert key in row, key
    assert len(row["per_digit_accuracy"]) == 10 and sum(row["class_histogram"]) == 20
    assert 0 <= row["class_entropy_bits"] <= np.log2(10) + 1e-9
    assert report["eta"] == 0.0  # model B has no guidance interval
    assert report["guidance_max_snr"] is None and report["guidance_min_snr"] is None

    # --eta reaches the DDIM sampler: the same seed with eta 1 adds fresh noise at each step,
    # so the samples, and with them the scores, differ from the deterministic run above.
    run_script("evaluate.py", "--ckpt", str(ckpt), "--num_samples", "20", "--sampler", "ddim",
               "--steps", "2", "--eta", "1", "--device", "cpu", "--data_dir", tiny_mnist,
               "--classifier", str(classifier), "--json", str(out))
    noisy = json.loads(out.read_text())
    assert noisy["eta"] == 1.0 and noisy["results"][0]["fid"] != row["fid"]
    assert "--eta is a DDIM option" in _error_line(capsys, ["--ckpt", str(ckpt), "--eta", "0.5"])
