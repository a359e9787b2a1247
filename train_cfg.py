"""Train model B, the class-conditional DiT (cross-attention, classifier-free guidance), on MNIST.

    python train_cfg.py                              # defaults below, checkpoints in checkpoints/dit_cfg
    python train_cfg.py @configs/cfg_cpu.args        # a recipe; later flags override it
    python train_cfg.py --resume checkpoints/dit_cfg/ckpt_interrupted.pt

train_cfg_ddp.py runs this same main() on every rank of a torchrun job.
"""
import torch

from cli import ArgumentParser, positive_int, probability, run_main
from dit_cfg import ConditionalDiT
from data import MNIST_CLASSES
from training import Dist, add_training_args, parse_training_args, train


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


def main(argv=None, dist=Dist(), device=None):
    args = parse_training_args(build_parser(), argv)
    # ConditionalDiT rejects a bad --cond_tokens itself (ModelConfigError, one line via
    # run_main) before any data is read, so the rule lives in one place
    model_config = dict(img_size=args.img_size, channels=args.channels, patch_size=args.patch_size,
                        num_classes=MNIST_CLASSES, dim=args.dim, depth=args.depth, heads=args.heads,
                        mlp_ratio=args.mlp_ratio, cond_tokens=args.cond_tokens,
                        cond_drop_prob=args.cond_drop_prob)
    preview_labels = torch.arange(MNIST_CLASSES).repeat_interleave(8)  # one row per digit; label 10 is the null label
    return train(args, ConditionalDiT, model_config, preview_labels=preview_labels,
                 num_preview=len(preview_labels), dist=dist, device=device)


if __name__ == "__main__":
    run_main(main)
