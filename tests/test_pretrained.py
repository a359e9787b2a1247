"""The shipped files in pretrained/: listed with their SHA-256, loaded without running code,
and working: the classifier reads real MNIST as documented, model B draws the digits asked
for, model A draws digits."""
import hashlib
import os
import re

import pytest
import torch

from checkpoint import CheckpointError, build_guide, load_checkpoint, load_model
from cli import PRETRAINED
from data import load_mnist
from evaluate import classify, load_classifier, samples_to_classifier_input
from sampling import DEFAULT_AUTOGUIDANCE_SCALE, generate_images
from tests.conftest import ROOT

LISTING = os.path.join(PRETRAINED, "README.md")
MNIST_DIR = os.path.join(ROOT, "data")  # laid out by .ci/run from ../shared/mnist


def listing():
    with open(LISTING) as f:
        return f.read()


def listed_files():
    """{file name: SHA-256} from the table in pretrained/README.md."""
    return dict(re.findall(r"^\| `([\w.]+\.pt)` \|.*\| `([0-9a-f]{64})` \|$", listing(), re.M))


def test_every_shipped_file_is_listed_with_its_sha256():
    listed = listed_files()
    shipped = sorted(name for name in os.listdir(PRETRAINED) if name.endswith(".pt"))
    assert shipped and sorted(listed) == shipped
    for name, sha256 in listed.items():
        with open(os.path.join(PRETRAINED, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha256, name
        # at most 16 MiB: model A carries its guide network beside its own weights (~7.5 MB each)
        assert os.path.getsize(os.path.join(PRETRAINED, name)) < 16 * 2**20


def real_mnist_test_set():
    try:
        return load_mnist(MNIST_DIR, train=False, download=False)
    except Exception:
        pytest.skip(f"the real MNIST test set is not in {MNIST_DIR} (.ci/run lays it out)")


def test_the_classifier_reads_real_test_digits_as_documented():
    documented = float(re.search(r"`mnist_classifier\.pt`: (\d+\.\d+)% of the 10,000 MNIST test digits",
                                 listing()).group(1))
    images, labels = real_mnist_test_set()
    classifier, recorded = load_classifier(os.path.join(PRETRAINED, "mnist_classifier.pt"))
    logits, _ = classify(classifier, images)
    accuracy = 100 * (logits.argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(documented, abs=0.005) and accuracy == pytest.approx(100 * recorded, abs=0.005)


@pytest.fixture(scope="module")
def judge():
    return load_classifier(os.path.join(PRETRAINED, "mnist_classifier.pt"))[0]


def test_model_b_draws_the_digits_asked_for(judge):
    """5 guided samples of each digit in 10 DPM-Solver++ steps: the classifier reads at least
    90% of them as the digit asked for (chance: 10%)."""
    model, scheduler, _ = load_model(os.path.join(PRETRAINED, "model_b.pt"), expected_kind="class_conditional")
    labels = torch.arange(10).repeat_interleave(5)
    samples = generate_images(model, scheduler, len(labels), labels=labels, steps=10, seed=0)
    logits, _ = classify(judge, samples_to_classifier_input(samples))
    assert (logits.argmax(1) == labels).float().mean() >= 0.9


def test_model_a_draws_digits(judge):
    """200 unconditional samples in 10 DPM-Solver++ steps, autoguided at the default scale as
    infer.py draws them, look like MNIST: dark images with thin bright strokes (mean pixel 0.13
    in [0, 1] on real digits, over 80% of pixels near black), read as many different digits,
    mostly with confidence (the shipped A: 0.959 on these 200, 0.908 without its guide; uniform
    noise scores 1.0 on a single class, so confidence alone would not do). The guide must
    raise the confidence of the same 200 draws (by 0.038 over 1000 samples in bf16, 0.051 on these
    200, 0.056 on 50 drawn with seed 0; a guide equal to the model adds exactly 0): it is what makes
    the shipped A read well."""
    model, scheduler, ckpt = load_model(os.path.join(PRETRAINED, "model_a.pt"), expected_kind="unconditional")
    guide = build_guide(ckpt)
    assert guide is not None
    confidence = {}
    for name, guide_or_none in (("guided", guide), ("alone", None)):
        images = samples_to_classifier_input(generate_images(
            model, scheduler, 200, steps=10, seed=0, guide=guide_or_none, guidance_scale=DEFAULT_AUTOGUIDANCE_SCALE))
        probabilities = classify(judge, images)[0].softmax(1)
        assert 0.10 < images.mean() < 0.17 and (images < 0.1).float().mean() > 0.7
        assert len(probabilities.argmax(1).unique()) >= 8
        confidence[name] = probabilities.max(1).values.mean().item()
    assert confidence["guided"] >= 0.85 and confidence["guided"] > confidence["alone"] + 0.02


def test_shipped_weights_sample_but_cannot_be_resumed():
    path = os.path.join(PRETRAINED, "model_b.pt")
    assert "optimizer" not in load_checkpoint(path)  # EMA weights only
    with pytest.raises(CheckpointError, match="weights only"):
        load_checkpoint(path, to_resume=True)
    with pytest.raises(CheckpointError, match="only the EMA weights"):
        load_model(path, use_ema=False)
