"""Score a diffusion checkpoint with an MNIST classifier: accuracy, coverage and MNIST-FID.

    python evaluate.py --ckpt checkpoints/ckpt_final.pt --num_samples 1000
    python evaluate.py --ckpt checkpoints/ckpt_final.pt --guidance_sweep 0,1,2,3,5 --json sweep.json

There is no Inception network offline, so the judge is a small CNN trained here on
the 60k MNIST training images (once, about 4 minutes on 2 CPU cores, >= 99.3% on the
test set) and cached at checkpoints/mnist_classifier.pt. From its outputs on the
generated images we report:

  accuracy    (class-conditional checkpoints) share of samples drawn for digit k
              that the classifier reads as k, per digit and averaged
  confidence  mean max softmax probability: do the samples look like *some* digit?
  entropy     of the histogram of predicted digits, in bits; log2(10) = 3.32 means
              every digit appears equally often (no mode collapse)
  MNIST-FID   Frechet distance between Gaussians fitted to the classifier's 128-d
              penultimate features of the samples and of the 10k MNIST test images

FID is biased upward at small N (the sample covariance of N points is noisy), so
the same distance for N *real* training images against the test set is printed
next to it as the floor: compare a model's FID with the floor at the same N.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, load_mnist

DEFAULT_CLASSIFIER = os.path.join("checkpoints", "mnist_classifier.pt")
CLASSIFIER_FORMAT = "simplest-diffusion/mnist-classifier/1"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the training set, p in [0, 1]


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

    def __init__(self, width=32, feature_dim=128, num_classes=10, dropout=0.3):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes, dropout=dropout)
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
        x = _to_unit(images[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        out, feat = model(x)
        logits.append(out.float().cpu())
        features.append(feat.float().cpu())
    return torch.cat(logits), torch.cat(features)


def train_classifier(images, labels, test_images=None, test_labels=None, epochs=8, batch_size=128,
                     seed=0, device="cpu", max_steps=None, lr=2e-3, progress=True):
    """Train an MNISTClassifier; returns (model in eval mode, test accuracy or None).

    images: uint8 (N, 28, 28); labels: int64 (N,). AdamW with a one-cycle learning
    rate, random shifts of up to 2 pixels, bf16 autocast (fast on CPUs with AVX-512
    bf16 or AMX, and on GPUs). Same seed, same machine -> same model.
    """
    torch.manual_seed(seed)  # weight init and dropout
    gen = torch.Generator().manual_seed(seed)  # batch order and shifts
    device = torch.device(device)
    images = _to_unit(images).to(device)  # (N, 1, 28, 28), 47 MB for all of MNIST
    labels = labels.to(device)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)

    model = MNISTClassifier().to(device, memory_format=torch.channels_last)  # NHWC: faster oneDNN convs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    use_bf16 = device.type in ("cpu", "cuda")
    model.train()
    bar = tqdm(range(total_steps), desc="classifier", disable=not progress)
    for step in bar:
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(images), generator=gen).to(device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        x = _random_shift(images[idx], 2, gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=step // steps_per_epoch + 1)
    model.eval()

    test_acc = None
    if test_images is not None:
        logits, _ = classify(model, test_images)
        test_acc = (logits.argmax(1) == test_labels.cpu()).float().mean().item()
        if progress:
            print(f"classifier test accuracy: {100 * test_acc:.2f}% on {len(test_images)} images")
    return model, test_acc


def save_classifier(model, test_acc, path, train_config=None):
    """Write {format, state_dict, config, test_acc} atomically (temp file, then os.replace)."""
    ckpt = {"format": CLASSIFIER_FORMAT,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "config": {"model": dict(model.config), "train": dict(train_config or {})},
            "test_acc": None if test_acc is None else float(test_acc)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".classifier-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    except BaseException:
        os.unlink(tmp)
        raise


def load_classifier(path, device="cpu"):
    """Returns (model in eval mode on `device`, its recorded test accuracy or None)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT:
            raise ValueError("not an evaluate.py classifier file")
        model = MNISTClassifier(**ckpt["config"]["model"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as err:
        raise ClassifierError(f"could not load the classifier {path} ({str(err).splitlines()[0]}); "
                              f"delete it to train a new one") from None
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
    model, test_acc = train_classifier(train_images, train_labels, test_images, test_labels, device=device)
    print(f"trained in {time.perf_counter() - t0:.0f} s; saved to {path}")
    save_classifier(model, test_acc, path, train_config=dict(epochs=8, batch_size=128, seed=0, lr=2e-3))
    return model, test_acc


# -----------------------------------------------------------------------------
# Frechet distance between two Gaussians, in float64 and without scipy


def feature_statistics(features):
    """(N, F) features -> mean (F,) and unbiased covariance (F, F), float64 numpy."""
    x = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
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
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
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
    x = samples.detach().float().cpu().clamp(-1, 1).add(1).div(2)[:, :1]  # (N, 1, H, W) in [0, 1]
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).mul(255).round().div(255)


def image_metrics(logits, features, ref_stats, labels=None):
    """Classifier statistics of one image set and its Frechet distance to `ref_stats`."""
    probs = logits.softmax(dim=1)
    confidence, pred = probs.max(dim=1)
    hist = torch.bincount(pred, minlength=logits.shape[1])
    p = hist[hist > 0].double() / len(pred)
    out = {"confidence": confidence.mean().item(),
           "class_histogram": hist.tolist(),
           "class_entropy_bits": float(-(p * p.log2()).sum()),
           "fid": frechet_distance(*feature_statistics(features), *ref_stats)}
    if labels is not None:
        per_digit = [(pred[labels == k] == k).float().mean().item() for k in range(logits.shape[1])]
        out["per_digit_accuracy"] = per_digit
        out["accuracy"] = float(np.mean(per_digit))
    return out


# -----------------------------------------------------------------------------
# Command line


def parse_scales(text):
    """'0,1,2,3,5' -> [0.0, 1.0, 2.0, 3.0, 5.0]; ValueError for anything else."""
    scales = [float(s) for s in text.split(",")]
    if not all(math.isfinite(s) and s >= 0 for s in scales):
        raise ValueError("guidance scales must be finite and >= 0")
    return scales


def print_report(report):
    cfg = report
    print(f"\ncheckpoint  {cfg['checkpoint']} ({cfg['kind']}, {'EMA' if cfg['use_ema'] else 'raw'} weights)")
    print(f"sampler     {cfg['sampler']}, {cfg['steps']} steps, seed {cfg['seed']}, {cfg['num_samples']} samples"
          + (f" ({cfg['num_samples'] // 10} per digit)" if cfg["kind"] == "dit_cfg" else ""))
    acc = cfg["classifier"]["test_acc"]
    print(f"classifier  {cfg['classifier']['path']} (test accuracy "
          f"{'unknown' if acc is None else f'{100 * acc:.2f}%'})\n")

    def row(name, r, seconds):
        a = f"{100 * r['accuracy']:7.2f}%" if "accuracy" in r else f"{'-':>8}"
        print(f"{name:>14} {a} {r['confidence']:10.3f} {r['class_entropy_bits']:13.3f} "
              f"{r['fid']:10.3f} {seconds:>11}")

    names = [("default" if r["guidance_scale"] is None else f"w={r['guidance_scale']:g}") for r in cfg["results"]]
    print(f"{'':>14} {'accuracy':>8} {'confidence':>10} {'entropy(bits)':>13} {'MNIST-FID':>10} {'sampling(s)':>11}")
    for name, r in zip(names, cfg["results"]):
        row(name, r, f"{r['sampling_seconds']:.1f}")
    row("real (floor)", cfg["real_floor"], "-")

    for title, key, fmt in (("per-digit accuracy (%)", "per_digit_accuracy", lambda v: f"{100 * v:5.1f}"),
                            ("predicted-digit histogram", "class_histogram", lambda v: f"{v:5d}")):
        rows = [(n, r[key]) for n, r in zip(names, cfg["results"]) if key in r]
        if key == "class_histogram":
            rows.append(("real (floor)", cfg["real_floor"][key]))
        if rows:
            print(f"\n{title}\n{'':>14} " + " ".join(f"{k:>5}" for k in range(10)))
            for n, values in rows:
                print(f"{n:>14} " + " ".join(fmt(v) for v in values))
    print(f"\n{cfg['fid_note']}")


def evaluate(args, parser):
    from checkpoint import CheckpointError, load_model  # the diffusion side, imported only when needed
    import sampling

    try:
        model, scheduler, ckpt = load_model(args.ckpt, args.device, use_ema=not args.no_ema)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    kind = ckpt["kind"]
    if kind == "dit_cfg":
        num_classes = ckpt["model_config"]["num_classes"]
        if num_classes != 10:
            sys.exit(f"error: {args.ckpt} has {num_classes} classes; the MNIST classifier knows 10")
        if args.num_samples % 10:
            parser.error(f"--num_samples must be a positive multiple of 10 for a class-conditional "
                         f"checkpoint (N/10 per digit), got {args.num_samples}")
        labels = torch.arange(10).repeat_interleave(args.num_samples // 10)  # (N,)
    else:
        if args.guidance_scale is not None or args.guidance_sweep is not None:
            parser.error(f"{args.ckpt} is unconditional ({kind}); guidance needs a class-conditional checkpoint")
        labels = None
    scales = args.guidance_sweep or [args.guidance_scale]
    # Resolve the step count here so the report states what actually ran.
    steps = args.steps
    if steps is None:
        default = sampling.DEFAULT_STEPS[args.sampler]
        steps = scheduler.num_timesteps if default is None else min(default, scheduler.num_timesteps)

    classifier, classifier_acc = load_or_train_classifier(args.classifier, args.data_dir, args.device)

    # Reference statistics from real images, once per run: the test set, and the floor
    # (N random training images, the best score N samples could hope for).
    test_images, _ = load_mnist(args.data_dir, train=False)
    _, test_features = classify(classifier, test_images, args.batch_size)
    test_stats = feature_statistics(test_features)
    train_images, train_labels = load_mnist(args.data_dir, train=True)
    n_real = min(args.num_samples, len(train_images))
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))[:n_real]
    real_logits, real_features = classify(classifier, train_images[pick], args.batch_size)
    real_floor = image_metrics(real_logits, real_features, test_stats, labels=train_labels[pick])
    real_floor["num_images"] = n_real

    results = []
    for scale in scales:
        t0 = time.perf_counter()
        # Every scale starts from the same seed (the same initial noise), so rows differ
        # by the guidance scale alone.
        samples = sampling.generate_images(model, scheduler, args.num_samples, labels=labels,
                                           guidance_scale=scale, sampler=args.sampler, steps=steps,
                                           seed=args.seed, device=args.device)
        seconds = time.perf_counter() - t0
        logits, features = classify(classifier, samples_to_classifier_input(samples), args.batch_size)
        results.append({"guidance_scale": scale, "sampling_seconds": seconds,
                        **image_metrics(logits, features, test_stats, labels)})

    return {
        "checkpoint": args.ckpt, "kind": kind, "use_ema": not args.no_ema,
        "num_samples": args.num_samples, "sampler": args.sampler, "steps": steps, "seed": args.seed,
        "classifier": {"path": args.classifier, "test_acc": classifier_acc},
        "results": results,
        "real_floor": real_floor,
        "fid_note": f"MNIST-FID is biased upward at small N; compare it with the floor, "
                    f"{real_floor['fid']:.3f} for {n_real} real training images vs the 10k test images.",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="diffusion checkpoint (from train.py or train_cfg.py)")
    parser.add_argument("--num_samples", type=int, default=1000,
                        help="images to generate (class-conditional: a multiple of 10, N/10 per digit)")
    guidance = parser.add_mutually_exclusive_group()
    guidance.add_argument("--guidance_scale", type=float, default=None,
                          help="classifier-free guidance scale (default: the sampler's default)")
    guidance.add_argument("--guidance_sweep", default=None, metavar="S1,S2,...",
                          help="evaluate several guidance scales, e.g. 0,1,2,3,5")
    parser.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim", "dpm++2m"])
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=500, help="classifier batch size")
    parser.add_argument("--data_dir", default="./data", help="folder that holds MNIST/")
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                        help="cached MNIST classifier; trained and saved here if missing")
    parser.add_argument("--no_ema", action="store_true", help="sample with the raw instead of the EMA weights")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    parser.add_argument("--train_classifier_only", action="store_true",
                        help="train (or load) the classifier, print its test accuracy and exit")
    args = parser.parse_args(argv)

    if args.guidance_sweep is not None:
        try:
            args.guidance_sweep = parse_scales(args.guidance_sweep)
        except ValueError:
            parser.error(f"--guidance_sweep expects comma-separated numbers >= 0 such as 0,1,2,3,5, "
                         f"got {args.guidance_sweep!r}")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        parser.error(f"--guidance_scale must be finite and >= 0, got {args.guidance_scale}")
    if args.num_samples < 1 or args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--num_samples, --batch_size and --steps must be positive")

    try:
        if args.train_classifier_only:
            _, acc = load_or_train_classifier(args.classifier, args.data_dir, args.device)
            print(f"classifier {args.classifier}: test accuracy "
                  f"{'unknown' if acc is None else f'{100 * acc:.2f}%'}")
            return
        if args.ckpt is None:
            parser.error("--ckpt is required (or pass --train_classifier_only)")
        if not os.path.isfile(args.ckpt):
            sys.exit(f"error: checkpoint {args.ckpt} not found")
        report = evaluate(args, parser)
    except (DataError, ClassifierError) as err:
        sys.exit(f"error: {err}")

    print_report(report)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
