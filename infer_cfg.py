"""Draw digits of a chosen label with model B (conditional DiT) and classifier-free guidance.

    python infer_cfg.py --output digits.png --label all     # the shipped weights, pretrained/model_b.pt
    python infer_cfg.py --ckpt checkpoints/dit_cfg/ckpt_final.pt --output four.jpg --label 4
    python infer_cfg.py --ckpt checkpoints/dit_cfg/ckpt_final.pt --output digits.png --label all --num_samples 8
    python infer_cfg.py --ckpt checkpoints/dit_cfg/ckpt_final.pt --output fours/ --label 4 --num_samples 100
"""
import argparse
import math

import torch

from cli import PRETRAINED_B, add_sampling_args, load_for_sampling, run_main, sampling_kwargs
from data import MNIST_CLASSES
from dit_cfg import ConditionalDiT
from images import sample_names, save_samples
from options import ArgumentParser, nonnegative_float
from sampling import DEFAULT_GUIDANCE_SCALE, generate_images

DIGITS = range(MNIST_CLASSES)


def label_arg(text):
    if text == "all":
        return text
    try:
        label = int(text)
    except ValueError:
        label = None
    if label not in DIGITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a digit label: use 0-9, or all "
                                         "for one row per digit")
    return label


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", type=label_arg, required=True,
                        help="the digit to draw, 0-9, or all (one row per digit; --num_samples "
                             "then counts samples per digit)")
    parser.add_argument("--guidance_scale", type=nonnegative_float, default=DEFAULT_GUIDANCE_SCALE,
                        help="pred = uncond + s * (cond - uncond): 1 is plain conditional "
                             "sampling, 0 unconditional")
    add_sampling_args(parser, default_ckpt=PRETRAINED_B)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    model, scheduler, _, device = load_for_sampling(args, expected_kind=ConditionalDiT.kind)
    digits = list(DIGITS) if args.label == "all" else [args.label]
    labels = torch.tensor(digits).repeat_interleave(args.num_samples)  # (len(digits) * N,)
    images = generate_images(model, scheduler, len(labels), labels=labels,
                             guidance_scale=args.guidance_scale, device=device,
                             **sampling_kwargs(args, scheduler, device))
    names = [name for digit in digits for name in sample_names(args.num_samples, prefix=f"{digit}_")]
    nrow = args.num_samples if args.label == "all" else math.ceil(math.sqrt(args.num_samples))
    save_samples(images, args.output, names, nrow=nrow, scale=args.scale)
    print(f"wrote {len(labels)} sample(s) to {args.output} (weights: {args.ckpt})")


if __name__ == "__main__":
    run_main(main)
