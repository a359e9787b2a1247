"""train_cfg_ddp.py on the CPU with gloo: two ranks, the same result as one process."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from checkpoint import load_checkpoint
from dit_cfg import ConditionalDiT
from scheduler import NoiseScheduler
from tests.conftest import ROOT, TINY_MODEL, run_script
from training import make_optimizer, training_step

TORCHRUN = shutil.which("torchrun")


def tiny_setup():
    torch.manual_seed(0)
    model = ConditionalDiT(img_size=8, patch_size=2, dim=32, depth=2, heads=4, cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(1)
    batch = dict(x0=torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, labels=torch.arange(8),
                 t=torch.randint(0, 1000, (8,), generator=g), noise=torch.randn(8, 1, 8, 8, generator=g))
    return model, NoiseScheduler(), batch


def two_steps(model, scheduler, batch, train_model=None):
    optimizer = make_optimizer(model, 1e-2, "cpu")  # the scripts' optimizer
    for _ in range(2):  # two steps, so that the zero-initialised layers pass gradients on
        training_step(train_model or model, scheduler, optimizer, batch["x0"], batch["labels"],
                      grad_clip=1.0, t=batch["t"], noise=batch["noise"])
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def ddp_worker(rank, store_path, out_dir):
    torch_dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        model, scheduler, batch = tiny_setup()
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}  # this rank's half
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.save(two_steps(model, scheduler, half, ddp), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def test_ddp_step_equals_single_process_step_on_the_global_batch(tmp_path):
    model, scheduler, batch = tiny_setup()
    single = two_steps(model, scheduler, batch)
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    untouched = tiny_setup()[0].state_dict()
    for name, tensor in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], tensor, atol=1e-5, rtol=1e-4), name
    # and the step really moved the weights (the comparison above is not vacuous)
    assert any(not torch.equal(single[n], untouched[n]) for n in single)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_on_cpu(tiny_mnist, tmp_path):
    save_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "train_cfg_ddp.py", "--device", "cpu",
         "--data_dir", tiny_mnist, "--save_dir", str(save_dir), "--img_size", "16",
         "--patch_size", "4", *TINY_MODEL, "--batch_size", "8", "--subset", "48",
         "--max_steps", "4", "--warmup_steps", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(save_dir)) == ["ckpt_final.pt", "metrics.csv", "options.args", "preview_final.png"]
    assert result.stdout.count("saved ") == 1  # only rank 0 logs
    ckpt = load_checkpoint(str(save_dir / "ckpt_final.pt"))
    assert ckpt["step"] == 4 and ckpt["args"]["batch_size"] == 8
    run_script("infer_cfg.py", "--ckpt", str(save_dir / "ckpt_final.pt"), "--output",
               str(tmp_path / "d.png"), "--label", "all", "--steps", "2")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_torchrun_every_rank_stops_when_rank_0_cannot_write(tiny_mnist, tmp_path):
    """Rank 0 alone checks --save_dir; its verdict reaches the other rank, which must stop
    too instead of waiting for it at the next collective."""
    (tmp_path / "a_file").write_text("not a directory")
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "train_cfg_ddp.py", "--device", "cpu",
         "--data_dir", tiny_mnist, "--save_dir", str(tmp_path / "a_file" / "run"), *TINY_MODEL],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: cannot write files in the output directory") == 2, result.stderr


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_torchrun_every_rank_stops_when_the_data_cannot_be_read(tmp_path):
    """Rank 0 reads MNIST first while the others wait; when it fails, its error must reach
    them, instead of leaving them at the collective that follows."""
    (tmp_path / "a_file").write_text("not a data folder")  # unreadable, and nothing to download into
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "train_cfg_ddp.py", "--device", "cpu",
         "--data_dir", str(tmp_path / "a_file"), "--save_dir", str(tmp_path / "run"), *TINY_MODEL],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: could not load MNIST") == 2, result.stderr


def test_without_torchrun_says_how_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "train_cfg_ddp.py", "--save_dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torchrun --nproc_per_node" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was trained or written


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_torchrun_every_rank_stops_when_rank_0_cannot_save_mid_run(tiny_mnist, tmp_path):
    """Rank 0 fails to write its first epoch checkpoint (a folder of that name is in the way);
    the other rank must stop with the same one line instead of waiting for it at a collective."""
    save_dir = tmp_path / "run"
    (save_dir / "ckpt_epoch_1.pt").mkdir(parents=True)
    (save_dir / "ckpt_epoch_1.pt" / "keep").write_text("a non-empty folder cannot be replaced")
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "train_cfg_ddp.py", "--device", "cpu",
         "--data_dir", tiny_mnist, "--save_dir", str(save_dir), "--img_size", "16", "--patch_size", "4",
         *TINY_MODEL, "--batch_size", "8", "--subset", "32", "--epochs", "2", "--save_freq", "1"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert result.stderr.count(f"error: could not write {save_dir / 'ckpt_epoch_1.pt'}") == 2, result.stderr


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_two_machines_train_as_one_machine_with_two_processes(tiny_mnist, tmp_path):
    """Two torchrun launches on this host stand for two machines (--nnodes 2, rendezvous on
    127.0.0.1, gloo), each with its own copy of MNIST, so that they share no file: the run
    ends with the weights of one machine running both processes. Only global rank 0 writes."""
    options = ["train_cfg_ddp.py", "--device", "cpu", "--img_size", "16", "--patch_size", "4", *TINY_MODEL,
               "--batch_size", "8", "--subset", "32", "--max_steps", "6", "--warmup_steps", "2",
               "--precision", "fp32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = free_port()
    launches = []
    for node in (0, 1):
        data_dir = tmp_path / f"machine{node}" / "data"
        shutil.copytree(tiny_mnist, data_dir)
        launches.append(subprocess.Popen(
            [TORCHRUN, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", *options,
             "--data_dir", str(data_dir), "--save_dir", str(tmp_path / f"machine{node}" / "run")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [launch.communicate(timeout=240) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    for launch, (out, err) in zip(launches, outputs):
        assert launch.returncode == 0, out + err
    assert not (tmp_path / "machine1" / "run").exists()  # rank 1 writes nothing

    one_machine = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", *options, "--data_dir", tiny_mnist,
         "--save_dir", str(tmp_path / "one_machine")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert one_machine.returncode == 0, one_machine.stdout + one_machine.stderr
    two = load_checkpoint(str(tmp_path / "machine0" / "run" / "ckpt_final.pt"))
    one = load_checkpoint(str(tmp_path / "one_machine" / "ckpt_final.pt"))
    assert two["step"] == one["step"] == 6 and two["world_size"] == 2
    untouched = ConditionalDiT(**one["model_config"]).state_dict()
    for key in ("model", "ema"):
        for name, tensor in one[key].items():
            assert torch.allclose(two[key][name], tensor, atol=1e-6), (key, name)
    assert any(not torch.equal(one["model"][n], untouched[n]) for n in untouched)  # it trained
