"""Draw digits with model A (the unconditional DiT) from a checkpoint.

    python infer.py --output grid.png --num_samples 16          # the shipped weights, pretrained/model_a.pt
    python infer.py --ckpt checkpoints/dit/ckpt_final.pt --output out.jpg
    python infer.py --ckpt checkpoints/dit/ckpt_final.pt --output grid.png --num_samples 16
    python infer.py --ckpt checkpoints/dit/ckpt_final.pt --output samples/ --num_samples 1000
"""
import math

from cli import (PRETRAINED_A, add_guidance_interval_args, add_sampling_args, load_for_sampling, load_guide,
                 resolve_autoguidance, run_main, sampling_kwargs)
from dit import DiT
from images import sample_names, save_samples
from options import ArgumentParser, nonnegative_float
from sampling import DEFAULT_AUTOGUIDANCE_SCALE, generate_images


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidance_scale", type=nonnegative_float, default=None,
                        help="autoguidance, for a checkpoint trained with --guide_epoch: pred = guide + "
                             "s * (model - guide), 1 is the model alone; none given: the checkpoint's "
                             f"(train.py --guidance_scale), else {DEFAULT_AUTOGUIDANCE_SCALE:g}")
    add_guidance_interval_args(parser)
    add_sampling_args(parser, default_ckpt=PRETRAINED_A)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    model, scheduler, ckpt, device = load_for_sampling(args, expected_kind=DiT.kind)
    guide = load_guide(ckpt, args, device)
    scale, min_snr, max_snr = resolve_autoguidance(args, ckpt)
    images = generate_images(model, scheduler, args.num_samples, guide=guide, guidance_scale=scale,
                             guidance_max_snr=max_snr, guidance_min_snr=min_snr, device=device,
                             **sampling_kwargs(args, scheduler, device))
    save_samples(images, args.output, sample_names(args.num_samples),
                 nrow=math.ceil(math.sqrt(args.num_samples)), scale=args.scale)
    print(f"wrote {args.num_samples} sample(s) to {args.output} (weights: {args.ckpt})")


if __name__ == "__main__":
    run_main(main)
