"""Train model A, the unconditional DiT, on MNIST.

    python train.py                                  # defaults below, checkpoints in checkpoints/dit
    python train.py @configs/dit_cpu.args            # a recipe; later flags override it
    python train.py --resume checkpoints/dit/ckpt_interrupted.pt
"""
from cli import run_main
from dit import DiT
from options import ArgumentParser
from training import add_training_args, model_options, resolve_run, train


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser, img_size=64, patch_size=2, save_dir="checkpoints/dit",
                      epochs=100, batch_size=64, lr=2e-4, guide=True)
    return parser


def main(argv=None):
    train(resolve_run(build_parser(), argv, DiT, model_options))


if __name__ == "__main__":
    run_main(main)
