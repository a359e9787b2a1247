"""Draw digits with model A (the unconditional DiT) from a checkpoint.

    python infer.py --ckpt checkpoints/dit/ckpt_final.pt --output out.jpg
    python infer.py --ckpt checkpoints/dit/ckpt_final.pt --output grid.png --num_samples 16
    python infer.py --ckpt checkpoints/dit/ckpt_final.pt --output samples/ --num_samples 1000
"""
import math

from checkpoint import load_model
from cli import ArgumentParser, add_sampling_args, resolve_device, run_main, sampling_kwargs
from dit import DiT
from images import check_output, save_samples
from sampling import generate_images


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_sampling_args(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_output(args.output)
    device = resolve_device(args.device)
    model, scheduler, _ = load_model(args.ckpt, device, use_ema=not args.no_ema,
                                     expected_kind=DiT.kind)
    images = generate_images(model, scheduler, args.num_samples, device=device,
                             **sampling_kwargs(args, scheduler, device))
    width = max(3, len(str(args.num_samples - 1)))
    names = [f"{i:0{width}d}" for i in range(args.num_samples)]
    save_samples(images, args.output, names, nrow=math.ceil(math.sqrt(args.num_samples)))
    print(f"wrote {args.num_samples} sample(s) to {args.output}")


if __name__ == "__main__":
    run_main(main)
