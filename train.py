"""Train model A, the unconditional DiT, on MNIST.

    python train.py                                  # defaults below, checkpoints in checkpoints/dit
    python train.py @configs/dit_cpu.args            # a recipe; later flags override it
    python train.py --resume checkpoints/dit/ckpt_interrupted.pt
"""
from cli import ArgumentParser, run_main
from dit import DiT
from training import add_training_args, parse_training_args, train


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser, img_size=64, patch_size=2, save_dir="checkpoints/dit",
                      epochs=100, batch_size=64, lr=2e-4)
    return parser


def main(argv=None):
    args = parse_training_args(build_parser(), argv)
    model_config = dict(img_size=args.img_size, channels=args.channels, patch_size=args.patch_size,
                        dim=args.dim, depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio)
    train(args, DiT, model_config, num_preview=16)


if __name__ == "__main__":
    run_main(main)
