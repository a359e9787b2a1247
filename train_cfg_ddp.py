"""Train model B with DistributedDataParallel on several GPUs or machines. Start it with torchrun:

    torchrun --nproc_per_node=8 train_cfg_ddp.py --batch_size 64
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_cfg_ddp.py

Every rank trains the run that train_cfg.py's options describe (same options, same
checkpoints); this file only joins the process group: NCCL with one GPU per process
(cuda:LOCAL_RANK), or gloo on the CPU (also with --device cpu). --batch_size is per
process: the global batch is batch_size * WORLD_SIZE.
"""
import os
import sys

import torch
import torch.distributed as torch_dist

import train_cfg
from cli import run_main
from options import DeviceError, resolve_device
from training import Ranks, train

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(argv=None):
    run = train_cfg.resolve(argv)  # bad options (or checkpoint) stop before the group is joined
    if any(name not in os.environ for name in TORCHRUN_ENV):
        sys.exit("error: train_cfg_ddp.py is started by torchrun, e.g. "
                 "`torchrun --nproc_per_node=2 train_cfg_ddp.py [options]` "
                 "(python train_cfg.py trains on one device)")
    ranks = Ranks(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                  world_size=int(os.environ["WORLD_SIZE"]))
    # the same checks and DeviceError as train_cfg.py; no --device means CUDA when there is one
    requested = resolve_device(run.args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if requested.type == "cuda":
        if requested.index is not None:
            raise DeviceError(f"--device {run.args.device}: under torchrun each process uses "
                              "cuda:LOCAL_RANK; pass --device cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
        if ranks.local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK {ranks.local_rank} but {torch.cuda.device_count()} GPU(s) "
                              "visible: start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", ranks.local_rank)  # one GPU per process: LOCAL_RANK picks it
        torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl", device_id=device)
    elif requested.type == "cpu":
        device = torch.device("cpu")
        torch_dist.init_process_group("gloo")
    else:
        raise DeviceError(f"--device {run.args.device}: DDP runs on CUDA (nccl) or on the CPU (gloo)")
    try:
        train(run, ranks, device)
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
