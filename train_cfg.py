"""Train model B, the class-conditional DiT (cross-attention, classifier-free guidance), on MNIST.

    python train_cfg.py                              # defaults below, checkpoints in checkpoints/dit_cfg
    python train_cfg.py @configs/cfg_cpu.args        # a recipe; later flags override it
    python train_cfg.py --resume checkpoints/dit_cfg/ckpt_interrupted.pt

train_cfg_ddp.py trains the same run on every rank of a torchrun job.
"""
from cli import run_main
from data import MNIST_CLASSES
from dit_cfg import ConditionalDiT
from options import ArgumentParser, positive_int, probability
from training import add_training_args, model_options, resolve_run, train


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser, img_size=32, patch_size=4, save_dir="checkpoints/dit_cfg",
                      epochs=100, batch_size=128, lr=3e-4)
    group = parser.add_argument_group("conditioning")
    group.add_argument("--cond_drop_prob", type=probability, default=0.1,
                       help="probability of replacing a label by the null label in training")
    group.add_argument("--cond_tokens", type=positive_int, default=4,
                       help="condition tokens per label (N2 >= 2, the keys of cross-attention)")
    return parser


def model_config(args):
    """ConditionalDiT's kwargs. It rejects a bad --cond_tokens itself (ModelConfigError, one
    line via run_main) before any data is read, so the rule lives in one place."""
    return dict(model_options(args), num_classes=MNIST_CLASSES, cond_tokens=args.cond_tokens,
                cond_drop_prob=args.cond_drop_prob)


def resolve(argv=None):
    """The run these options (or the checkpoint they resume) describe."""
    return resolve_run(build_parser(), argv, ConditionalDiT, model_config)


def main(argv=None):
    train(resolve(argv))


if __name__ == "__main__":
    run_main(main)
