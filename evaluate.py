"""Score a diffusion checkpoint with an MNIST classifier: accuracy, coverage and MNIST-FID.

    python evaluate.py --ckpt checkpoints/dit/ckpt_final.pt --num_samples 1000
    python evaluate.py --ckpt checkpoints/dit_cfg/ckpt_final.pt --guidance_sweep 0,1,2,3,5 --json r.json

There is no Inception network offline, so the judge is a small CNN trained on the 60k
MNIST training images (CLASSIFIER_RECIPE). The repo ships one, pretrained/mnist_classifier.pt,
the default --classifier, so that every FID in the docs can be reproduced; a --classifier
path that does not exist yet gets a new one, trained there in a few minutes on a CPU
(pretrained/README.md gives its accuracy). From its outputs on the generated images we report:

  accuracy    (class-conditional checkpoints) share of samples drawn for digit k
              that the classifier reads as k, per digit and averaged
  confidence  mean max softmax probability: do the samples look like *some* digit?
  entropy     of the histogram of predicted digits, in bits; log2(10) = 3.32 means
              every digit appears equally often (no mode collapse)
  MNIST-FID   Frechet distance between Gaussians fitted to the classifier's 128-d
              penultimate features of the samples and of the 10k MNIST test images

FID is biased upward at small N (the sample covariance of N points is noisy), so
the same distance for N *real* training images against the test set is printed
next to it as the floor: compare a model's FID with the floor at the same N. The
floor's images take the samples' path (resized to the model's resolution and back),
so it is what N perfect samples would score. Confidence alone is a weak signal: on
digits buried in noise (std 0.5) the classifier is 99% confident and 9% right, while
their FID is about 180.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sampling
from checkpoint import load_model, one_line_reason, save_checkpoint
from cli import (PRETRAINED, add_eta_arg, add_guidance_interval_args, add_sampler_args, add_variance_arg,
                 check_sampler_options, load_guide, resolve_autoguidance, resolve_steps, run_main)
from data import MNIST_CLASSES, load_mnist, resize_images, to_model_range
from images import check_output_file
from options import (AMP_DTYPES, ArgumentParser, UsageError, add_device_arg, add_precision_arg, guidance_list,
                     nonnegative_float, positive_int, resolve_device, resolve_precision)

DEFAULT_CLASSIFIER = os.path.join(PRETRAINED, "mnist_classifier.pt")
CLASSIFIER_FORMAT = "simplest-diffusion/mnist-classifier/1"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the training set, p in [0, 1]
# How the judge is trained (the shipped one included): 3 epochs in fp32, a few minutes on 2 CPU cores.
CLASSIFIER_RECIPE = dict(epochs=3, batch_size=128, lr=2e-3, seed=0)


class ClassifierError(RuntimeError):
    """The cached classifier could not be used; the message says what to do."""


# -----------------------------------------------------------------------------
# The judge: a small CNN whose penultimate layer doubles as the FID feature space


def _conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MNISTClassifier(nn.Module):
    """(B, 1, 28, 28) pixels in [0, 1] -> logits (B, 10), features (B, feature_dim).

    Two VGG-style stages (28 -> 14 -> 7) and one fully connected feature layer.
    Normalisation happens inside, so every caller feeds plain [0, 1] pixels.
    """

    def __init__(self, width=32, feature_dim=128, num_classes=MNIST_CLASSES, dropout=0.3):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes,
                           dropout=dropout)
        c = width
        self.conv = nn.Sequential(
            _conv_block(1, c), _conv_block(c, c), nn.MaxPool2d(2),              # (B, c, 14, 14)
            _conv_block(c, 2 * c), _conv_block(2 * c, 2 * c), nn.MaxPool2d(2),  # (B, 2c, 7, 7)
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 7 * 7, feature_dim, bias=False),
                                nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def forward(self, x):
        x = (x - MNIST_MEAN) / MNIST_STD
        features = self.fc(self.conv(x))  # (B, feature_dim)
        return self.head(features), features


def _to_unit(images):
    """uint8 (N, 28, 28) / (N, 1, 28, 28) or float [0, 1] -> float32 (N, 1, 28, 28) in [0, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _random_shift(images, max_shift, generator):
    """Move each image of (B, 1, H, W) by its own integer (dy, dx) in [-s, s]; zeros fill in.

    One gather: out[b, 0, i, j] = padded[b, 0, i + dy_b, j + dx_b].
    """
    s = max_shift
    b, _, h, w = images.shape
    padded = F.pad(images, (s, s, s, s))  # (B, 1, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * s + 1, (2, b, 1), generator=generator).to(images.device)
    rows = dy + torch.arange(h, device=images.device)  # (B, H)
    cols = dx + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def classify(model, images, batch_size=500):
    """Logits (N, 10) and features (N, F), float32 on the CPU; fp32 for precise statistics."""
    model.eval()
    device = next(model.parameters()).device
    logits, features = [], []
    for i in range(0, len(images), batch_size):
        x = _to_unit(images[i:i + batch_size]).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        out, feat = model(x)
        logits.append(out.float().cpu())
        features.append(feat.float().cpu())
    return torch.cat(logits), torch.cat(features)


def train_classifier(images, labels, test_images=None, test_labels=None, epochs=3, batch_size=128,
                     seed=0, device="cpu", max_steps=None, lr=2e-3, progress=True):
    """Train an MNISTClassifier; returns (model in eval mode, test accuracy or None).

    images: uint8 (N, 28, 28); labels: int64 (N,). AdamW with a one-cycle learning
    rate, random shifts of up to 2 pixels, in fp32 on every device, so that the judge does
    not depend on the hardware's precision (defaults: CLASSIFIER_RECIPE, the cached judge's).
    Same seed, same machine -> same model.
    """
    torch.manual_seed(seed)  # weight init and dropout
    gen = torch.Generator().manual_seed(seed)  # batch order and shifts
    device = torch.device(device)
    images = _to_unit(images).to(device)  # (N, 1, 28, 28), 47 MB for all of MNIST
    labels = labels.to(device)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(max_steps, total_steps)

    # channels_last (NHWC) is the layout oneDNN's fast convolutions want
    model = MNISTClassifier().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                pct_start=0.15)
    # Once the loss is tiny, confident examples send gradients below float32's normal range;
    # CPU arithmetic on such denormals is 10-20x slower, so flush them to zero while training.
    flush = torch.set_flush_denormal(True)
    model.train()
    bar = tqdm(range(total_steps), desc="classifier", disable=not progress)
    for step in bar:
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(images), generator=gen).to(device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        x = _random_shift(images[idx], 2, gen).contiguous(memory_format=torch.channels_last)
        logits, _ = model(x)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=step // steps_per_epoch + 1)
    model.eval()
    if flush:
        torch.set_flush_denormal(False)  # back to PyTorch's default

    test_acc = None
    if test_images is not None:
        logits, _ = classify(model, test_images)
        test_acc = (logits.argmax(1) == test_labels.cpu()).sum().item() / len(test_labels)
        if progress:
            print(f"classifier test accuracy: {100 * test_acc:.2f}% on {len(test_images)} images")
    return model, test_acc


def save_classifier(model, test_acc, path, train_config=None):
    """Write {format, state_dict, config, test_acc} atomically (temp file, then os.replace)."""
    ckpt = {"format": CLASSIFIER_FORMAT,
            "state_dict": {k: v.cpu().contiguous() for k, v in model.state_dict().items()},
            "config": {"model": dict(model.config), "train": dict(train_config or {})},
            "test_acc": None if test_acc is None else float(test_acc)}
    save_checkpoint(ckpt, path)


def load_classifier(path, device="cpu"):
    """Returns (model in eval mode on `device`, its recorded test accuracy or None)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT:
            raise ValueError("not an evaluate.py classifier file")
        model = MNISTClassifier(**ckpt["config"]["model"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as err:
        raise ClassifierError(f"could not load the classifier {path} ({one_line_reason(err)}); "
                              "delete it to train a new one") from None
    return model.to(device).eval(), ckpt.get("test_acc")


def load_or_train_classifier(path, data_dir, device="cpu"):
    """Load the cached classifier, or train one on MNIST, save it to `path` and return it.

    Returns (model in eval mode, test accuracy). Raises DataError without MNIST.
    """
    if os.path.exists(path):
        return load_classifier(path, device)
    print(f"no classifier at {path}: training one on the 60k MNIST training images "
          f"(a few minutes on a CPU, once)")
    train_images, train_labels = load_mnist(data_dir, train=True)
    test_images, test_labels = load_mnist(data_dir, train=False)
    t0 = time.perf_counter()
    model, test_acc = train_classifier(train_images, train_labels, test_images, test_labels,
                                       device=device, **CLASSIFIER_RECIPE)
    save_classifier(model, test_acc, path, train_config=CLASSIFIER_RECIPE)
    print(f"trained in {time.perf_counter() - t0:.0f} s; saved to {path}")
    return model, test_acc


# -----------------------------------------------------------------------------
# Frechet distance between two Gaussians, in float64 and without scipy


def feature_statistics(features):
    """(N, F) features -> mean (F,) and unbiased covariance (F, F), float64 numpy."""
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(a):
    """Symmetric square root of a symmetric PSD matrix: V diag(sqrt(w)) V^T."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    S1 S2 = sqrt(S1) [sqrt(S1) S2 sqrt(S1)] sqrt(S1)^-1 is similar to the symmetric PSD
    matrix M = sqrt(S1) S2 sqrt(S1) (by continuity also for singular S1), so
    Tr((S1 S2)^(1/2)) = sum_i sqrt(eig_i(M)); round-off negatives are clamped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross))


# -----------------------------------------------------------------------------
# Metrics of one set of images


def samples_to_classifier_input(samples):
    """Model output (N, C, H, W) in about [-1, 1] -> (N, 1, 28, 28) in [0, 1], 8-bit levels.

    Channel 0, antialiased resize to 28x28 (as data.resize_images does), then
    quantisation to k/255 so the classifier sees the same kind of pixels it was
    trained on (and that a saved PNG would hold).
    """
    x = samples.detach().float().cpu()[:, :1].clamp(-1, 1).add(1).div(2)  # (N, 1, H, W), [0, 1]
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).mul(255).round().div(255)


def image_metrics(logits, features, ref_stats, labels=None):
    """Classifier statistics of one image set and its Frechet distance to `ref_stats`."""
    probs = logits.softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    hist = torch.bincount(pred, minlength=logits.shape[1])
    p = hist[hist > 0].double() / len(pred)  # entropy = sum p log2(1/p), 0 log 0 = 0
    out = {"confidence": confidence.mean().item(),
           "class_histogram": hist.tolist(),
           "class_entropy_bits": float((p * (1 / p).log2()).sum()),
           "fid": frechet_distance(*feature_statistics(features), *ref_stats)}
    if labels is not None:
        # Share of the label-k images read as k (None if there are none: a small real set
        # may miss a digit); overall, the mean of these for model B's N/10 samples per digit.
        per_digit = [(pred[labels == k] == k).sum().item() / (labels == k).sum().item()
                     if (labels == k).any() else None for k in range(logits.shape[1])]
        out["per_digit_accuracy"] = per_digit
        out["accuracy"] = (pred == labels).sum().item() / len(labels)
    return out


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="diffusion checkpoint written by train.py or train_cfg.py")
    parser.add_argument("--num_samples", type=positive_int, default=1000,
                        help="images to generate (model B: a multiple of 10, N/10 per digit)")
    guidance = parser.add_mutually_exclusive_group()
    guidance.add_argument("--guidance_scale", type=nonnegative_float, default=None,
                          help="classifier-free guidance scale of model B, or the autoguidance scale "
                               "of model A trained with --guide_epoch; none given: "
                               f"{sampling.DEFAULT_GUIDANCE_SCALE:g} (B); A with a guide: the checkpoint's "
                               f"(train.py --guidance_scale), else {sampling.DEFAULT_AUTOGUIDANCE_SCALE:g}")
    guidance.add_argument("--guidance_sweep", type=guidance_list, default=None, metavar="S1,S2,...",
                          help="evaluate several guidance scales, one row each, e.g. 0,1,2,3,5")
    add_guidance_interval_args(parser)
    add_sampler_args(parser)
    add_eta_arg(parser)
    add_variance_arg(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the samples and the choice of the floor's real images")
    parser.add_argument("--batch_size", type=positive_int, default=256,
                        help="images denoised, or classified, at once")
    parser.add_argument("--data_dir", default="./data", help="folder that holds MNIST/")
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                        help="MNIST classifier file (the shipped one by default); a path that "
                             "does not exist gets a new classifier, trained and saved there")
    parser.add_argument("--no_ema", action="store_true",
                        help="sample with the raw weights, not the EMA")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="also write the report to this JSON file")
    parser.add_argument("--train_classifier_only", action="store_true",
                        help="train (or load) the classifier, print its test accuracy and exit")
    add_precision_arg(parser)
    add_device_arg(parser)
    return parser


def evaluate(args):
    """Sample from args.ckpt at each guidance scale and score the samples -> report dict."""
    device = resolve_device(args.device)
    model, scheduler, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema)
    if model.num_classes:  # a class-conditional model: N/10 samples drawn for each digit
        if model.num_classes != MNIST_CLASSES:
            raise UsageError(f"{args.ckpt} has {model.num_classes} classes; "
                             f"the MNIST classifier knows {MNIST_CLASSES}")
        if args.num_samples % MNIST_CLASSES:
            raise UsageError(f"--num_samples must be a multiple of {MNIST_CLASSES} for model B "
                             f"(N/{MNIST_CLASSES} per digit), got {args.num_samples}")
        labels = torch.arange(MNIST_CLASSES).repeat_interleave(args.num_samples // MNIST_CLASSES)  # 0,0,..,1,1,..
        scales = args.guidance_sweep or [sampling.DEFAULT_GUIDANCE_SCALE
                                         if args.guidance_scale is None else args.guidance_scale]
        for option in ("guidance_max_snr", "guidance_min_snr"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option} sets where model A's autoguidance acts; "
                                 f"{args.ckpt} holds model B, guided at every step")
        guide, min_snr, max_snr = None, None, None
    else:
        guide = load_guide(ckpt, args, device)
        labels, scales = None, [None]
        scale, min_snr, max_snr = resolve_autoguidance(args, ckpt)
        if guide is not None:
            scales = args.guidance_sweep or [scale]
    steps = resolve_steps(args.steps, args.sampler, scheduler)  # the report states what ran
    check_sampler_options(args)
    precision = resolve_precision(args.precision, device)

    classifier, classifier_acc = load_or_train_classifier(args.classifier, args.data_dir, device)

    # Reference statistics from real images, once per run: the 10k test images, and the
    # floor: N random training images as the diffusion model saw them (resized to its
    # img_size, in [-1, 1]) and brought back like its samples, i.e. what N perfect
    # samples would score. The 28 -> S -> 28 round trip blurs a little, which is part of
    # the floor: at N = 1000 real images score about 0.6 directly, 2.5 at S = 32 or 64.
    test_images, _ = load_mnist(args.data_dir, train=False)
    test_stats = feature_statistics(classify(classifier, test_images, args.batch_size)[1])
    train_images, train_labels = load_mnist(args.data_dir, train=True)
    n_real = min(args.num_samples, len(train_images))
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(train_images), generator=gen)[:n_real]
    real = to_model_range(resize_images(train_images[pick], model.img_size, model.channels), "cpu")
    real = samples_to_classifier_input(real)  # (N, 1, 28, 28) in [0, 1]
    real_logits, real_features = classify(classifier, real, args.batch_size)
    real_floor = {"num_images": n_real, **image_metrics(real_logits, real_features, test_stats,
                                                        labels=train_labels[pick])}

    results = []
    for scale in scales:
        # Every scale starts from the same seed (the same noise): rows differ by the scale alone.
        t0 = time.perf_counter()
        samples = sampling.generate_images(model, scheduler, args.num_samples, labels=labels,
                                           guidance_scale=scale, guide=guide, guidance_max_snr=max_snr,
                                           guidance_min_snr=min_snr,
                                           sampler=args.sampler, steps=steps,
                                           eta=args.eta, variance=args.variance,
                                           seed=args.seed, device=device, amp_dtype=AMP_DTYPES[precision],
                                           batch_size=args.batch_size, progress=True)
        seconds = time.perf_counter() - t0
        images = samples_to_classifier_input(samples)  # (N, 1, 28, 28) in [0, 1]
        logits, features = classify(classifier, images, args.batch_size)
        results.append({"guidance_scale": scale, "sampling_seconds": seconds,
                        **image_metrics(logits, features, test_stats, labels)})

    return {
        "checkpoint": args.ckpt, "kind": ckpt["kind"], "num_classes": model.num_classes,
        "use_ema": not args.no_ema,
        "guide_epoch": ckpt["args"].get("guide_epoch") if guide is not None else None,
        # JSON has no infinity: "inf" when every step is guided
        "guidance_max_snr": None if guide is None else max_snr if math.isfinite(max_snr) else "inf",
        "guidance_min_snr": None if guide is None else min_snr,
        "num_samples": args.num_samples, "sampler": args.sampler, "steps": steps, "eta": args.eta,
        "variance": args.variance,
        "seed": args.seed, "device": str(device),
        "precision": precision,
        "classifier": {"path": args.classifier, "test_acc": classifier_acc},
        "results": results,
        "real_floor": real_floor,
        "fid_note": f"MNIST-FID is biased upward at small N: compare it with the floor, "
                    f"{real_floor['fid']:.3f} for {n_real} real training images vs the 10k "
                    "test images.",
    }


def print_report(report):
    r = report
    per_digit = f" ({r['num_samples'] // r['num_classes']} per digit)" if r["num_classes"] else ""
    acc = r["classifier"]["test_acc"]
    weights = ("EMA" if r["use_ema"] else "raw") + " weights"
    if r["guide_epoch"] is not None:
        weights += (f", autoguided by its EMA of epoch {r['guide_epoch']} "
                    f"where {r['guidance_min_snr']:g} <= SNR(t) <= {r['guidance_max_snr']}")
    print(f"\ncheckpoint  {r['checkpoint']} ({r['kind']}, {weights})")
    noise = "" if r["variance"] is None else f" ({r['variance']} variance)"
    if r["eta"]:
        noise += f" (eta {r['eta']:g})"
    print(f"sampling    {r['sampler']}{noise}, {r['steps']} steps, seed {r['seed']}, "
          f"{r['num_samples']} samples{per_digit}, {r['precision']} on {r['device']}")
    print(f"classifier  {r['classifier']['path']} (test accuracy "
          f"{'unknown' if acc is None else f'{100 * acc:.2f}%'})\n")

    names = ["uncond" if row["guidance_scale"] is None else f"w={row['guidance_scale']:g}"
             for row in r["results"]]
    rows = list(zip(names, r["results"])) + [("real (floor)", r["real_floor"])]
    print(f"{'':>12} {'accuracy':>8} {'confidence':>10} {'entropy(bits)':>13} {'MNIST-FID':>9} "
          f"{'sampling':>9}")
    for name, row in rows:
        accuracy = f"{100 * row['accuracy']:7.2f}%" if "accuracy" in row else f"{'-':>8}"
        seconds = f"{row['sampling_seconds']:8.1f}s" if "sampling_seconds" in row else f"{'-':>9}"
        print(f"{name:>12} {accuracy} {row['confidence']:10.3f} {row['class_entropy_bits']:13.3f} "
              f"{row['fid']:9.3f} {seconds}")

    for title, key, fmt in (("per-digit accuracy (%)", "per_digit_accuracy",
                             lambda v: f"{'-':>5}" if v is None else f"{100 * v:5.1f}"),
                            ("predicted-digit histogram", "class_histogram", lambda v: f"{v:5d}")):
        table = [(name, row[key]) for name, row in rows if key in row]
        if len(table) > 1 or key == "class_histogram":
            print(f"\n{title}\n{'':>12} " + " ".join(f"{k:>5}" for k in range(10)))
            for name, values in table:
                print(f"{name:>12} " + " ".join(fmt(v) for v in values))
    print(f"\n{r['fid_note']}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json:
        # now, not after minutes of classifier training and sampling; a missing folder is created
        check_output_file(args.json, missing_folder_ok=True)
    try:
        if args.train_classifier_only:
            device = resolve_device(args.device)
            _, acc = load_or_train_classifier(args.classifier, args.data_dir, device)
            acc = "unknown" if acc is None else f"{100 * acc:.2f}%"
            print(f"classifier {args.classifier}: test accuracy {acc}")
            return
        if args.ckpt is None:
            parser.error("--ckpt is required (or pass --train_classifier_only)")
        report = evaluate(args)
    except ClassifierError as err:
        sys.exit(f"error: {err}")
    print_report(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)  # CheckpointError, DataError, UsageError, ... -> one line "error: ..."
