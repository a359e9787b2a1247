"""End to end through the real entry points, on tiny synthetic MNIST and tiny models."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

import evaluate
import figures
import infer
import infer_cfg
import train
import train_cfg
import train_cfg_ddp
import training
from checkpoint import CheckpointError, load_checkpoint, load_model, network
from cli import run_main
from dit import DiT
from sampling import DEFAULT_AUTOGUIDANCE_MAX_SNR
from tests.conftest import ROOT, TINY_MODEL, run_script

# the same tiny options serve train.py and train_cfg.py
TINY_RUN = ["--img_size", "16", "--patch_size", "4", *TINY_MODEL, "--batch_size", "16",
            "--subset", "48", "--warmup_steps", "2"]


def error_of(main, argv, monkeypatch, capsys):
    """Run a script's main() as its `__main__` does, in this process; it must fail, and the
    one-line message it ends with is returned (argparse's usage error, or run_main's)."""
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    code = exit_info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code not in (0, None) and "\n" not in message.strip()
    return message


def tiny_training_run(script, tiny_mnist, save_dir):
    """4 steps of `script` on the tiny data, through the real entry point; returns save_dir."""
    run_script(script, "--data_dir", tiny_mnist, "--save_dir", str(save_dir), "--max_steps", "4",
               *TINY_RUN)
    return save_dir


@pytest.fixture(scope="module")
def run_a(tiny_mnist, tmp_path_factory):
    return tiny_training_run("train.py", tiny_mnist, tmp_path_factory.mktemp("run_a"))


@pytest.fixture(scope="module")
def run_b(tiny_mnist, tmp_path_factory):
    return tiny_training_run("train_cfg.py", tiny_mnist, tmp_path_factory.mktemp("run_b"))


def test_train_writes_a_plain_checkpoint_and_preview(run_a):
    ckpt = load_checkpoint(str(run_a / "ckpt_final.pt"))  # weights_only=True inside
    assert ckpt["kind"] == "unconditional" and ckpt["step"] == 4
    assert ckpt["model_config"]["dim"] == 32 and ckpt["scheduler_config"]["timesteps"] == 1000
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["max_steps"] == 4
    for state in (ckpt["model"], ckpt["ema"]):
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    assert set(ckpt["model"]) == set(ckpt["ema"])
    # the EMA moved away from the raw weights but is not equal to them
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    assert Image.open(run_a / "preview_final.png").size[0] > 16


def test_prediction_and_loss_weighting_live_in_the_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys):
    """--prediction, --loss_weighting and --min_snr_gamma (by default v, min_snr and 5) reach the
    training loss, are stored, and the checkpoint's schedule tells sampling how to read the output;
    a resume keeps the target; a checkpoint written before --prediction existed loads as an eps model."""
    from checkpoint import build_model

    recipe = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--max_steps", "3"]
    # in this process (the command line's own path is tested elsewhere): three runs, one import
    train.main([*recipe, "--save_dir", str(tmp_path / "eps"), "--prediction", "eps", "--min_snr_gamma", "0"])
    train.main([*recipe, "--save_dir", str(tmp_path / "v"), "--importance_sampling"])
    ckpt = load_checkpoint(str(tmp_path / "v" / "ckpt_final.pt"))
    assert ckpt["scheduler_config"]["prediction"] == "v" and ckpt["args"]["min_snr_gamma"] == 5.0
    assert ckpt["args"]["importance_sampling"] is True
    assert build_model(ckpt)[1].prediction == "v"
    eps_ckpt = load_checkpoint(str(tmp_path / "eps" / "ckpt_final.pt"))
    assert eps_ckpt["scheduler_config"]["prediction"] == "eps"
    assert eps_ckpt["args"]["min_snr_gamma"] == 0.0 and eps_ckpt["args"]["importance_sampling"] is False
    # the same start, data and noise: only the target and the weights differ, so do the weights after
    assert not torch.equal(ckpt["model"]["final_layer.linear.bias"], eps_ckpt["model"]["final_layer.linear.bias"])
    assert ckpt["args"]["loss_weighting"] == "min_snr"
    # P2 instead of min-SNR, all else the same: stored, and the weights after 3 steps differ
    train.main([*recipe, "--save_dir", str(tmp_path / "p2"), "--importance_sampling", "--loss_weighting", "p2"])
    p2_ckpt = load_checkpoint(str(tmp_path / "p2" / "ckpt_final.pt"))
    assert p2_ckpt["args"]["loss_weighting"] == "p2"
    assert not torch.equal(ckpt["model"]["final_layer.linear.bias"], p2_ckpt["model"]["final_layer.linear.bias"])

    message = error_of(train.main, ["--resume", str(tmp_path / "v" / "ckpt_final.pt"), "--prediction", "eps"],
                       monkeypatch, capsys)
    assert "--prediction eps (the checkpoint's is v)" in message

    del eps_ckpt["scheduler_config"]["prediction"]
    torch.save(eps_ckpt, tmp_path / "old.pt")
    assert build_model(load_checkpoint(str(tmp_path / "old.pt")))[1].prediction == "eps"
    run_script("infer.py", "--ckpt", str(tmp_path / "v" / "ckpt_final.pt"), "--steps", "2",
               "--output", str(tmp_path / "v.png"))
    assert Image.open(tmp_path / "v.png").size[0] >= 16


def test_gelu_approximate_lives_in_the_checkpoint_and_a_resume_keeps_it(run_a, tiny_mnist, tmp_path, monkeypatch,
                                                                        capsys):
    """--gelu_approximate none is the trained model's GELU, kept in its config, and sampling rebuilds
    it; a checkpoint whose config lacks the key (so the default, tanh) resumes as tanh and
    refuses another GELU in one line."""
    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--max_steps", "2",
                "--gelu_approximate", "none", "--save_dir", str(tmp_path / "exact")])
    ckpt = load_checkpoint(str(tmp_path / "exact" / "ckpt_final.pt"))
    assert ckpt["model_config"]["gelu_approximate"] == ckpt["args"]["gelu_approximate"] == "none"
    assert [block.mlp.gelu_approximate for block in network(ckpt).blocks] == ["none"] * 2

    old = torch.load(run_a / "ckpt_final.pt", weights_only=True)
    assert old["model_config"].pop("gelu_approximate") == "tanh"
    del old["args"]["gelu_approximate"]
    torch.save(old, tmp_path / "old.pt")
    message = error_of(train.main, ["--resume", str(tmp_path / "old.pt"), "--gelu_approximate", "none"],
                       monkeypatch, capsys)
    assert "--gelu_approximate none (the checkpoint's is tanh)" in message
    train.main(["--resume", str(tmp_path / "old.pt"), "--max_steps", "5", "--save_dir", str(tmp_path / "resumed")])
    resumed = load_checkpoint(str(tmp_path / "resumed" / "ckpt_final.pt"))
    assert resumed["step"] == 5 and resumed["model_config"]["gelu_approximate"] == "tanh"


def test_infer_single_image_grid_and_directory(run_a, tmp_path):
    ckpt = str(run_a / "ckpt_final.pt")
    infer.main(["--ckpt", ckpt, "--output", str(tmp_path / "one.jpg"), "--steps", "3"])
    assert Image.open(tmp_path / "one.jpg").size == (16, 16)
    infer.main(["--ckpt", ckpt, "--output", str(tmp_path / "grid.png"), "--num_samples", "4",
                "--sampler", "ddpm", "--steps", "3"])
    assert Image.open(tmp_path / "grid.png").size == (2 + 2 * 18, 2 + 2 * 18)
    infer.main(["--ckpt", ckpt, "--output", str(tmp_path / "samples") + "/", "--num_samples", "3",
                "--steps", "2"])
    assert sorted(os.listdir(tmp_path / "samples")) == ["000.png", "001.png", "002.png"]


def test_infer_is_reproducible_with_a_seed(run_a, tmp_path):
    ckpt = str(run_a / "ckpt_final.pt")
    for name, seed in (("a.png", "7"), ("b.png", "7"), ("c.png", "8")):
        infer.main(["--ckpt", ckpt, "--output", str(tmp_path / name), "--steps", "3",
                    "--num_samples", "2", "--seed", seed])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_infer_variance_reaches_the_ddpm_sampler(run_a, tmp_path):
    """--variance beta and posterior give different pictures from the same seed, and leaving it
    out on a respaced chain is the posterior variance (sampling.FEW_STEP_VARIANCE)."""
    ckpt = str(run_a / "ckpt_final.pt")
    for variance in ("beta", "posterior", None):
        infer.main(["--ckpt", ckpt, "--output", str(tmp_path / f"{variance}.png"), "--sampler", "ddpm",
                    "--steps", "3", "--num_samples", "4", *(["--variance", variance] if variance else [])])
    pictures = {v: (tmp_path / f"{v}.png").read_bytes() for v in ("beta", "posterior", None)}
    assert pictures["beta"] != pictures["posterior"] and pictures[None] == pictures["posterior"]


def resolved_options(argv):
    """train.py's options as training.train() gets them: parsed, a --resume checkpoint's filled in."""
    return training.resolve_run(train.build_parser(), argv, DiT, training.model_options).args


@pytest.mark.parametrize("argv,guide_epoch", [
    ([], 20), (["--epochs", "21"], 20), (["--epochs", "20"], 0), (["--epochs", "3"], 0),
    (["--guide_epoch", "3"], 3), (["--guide_epoch", "0"], 0)])
def test_a_new_run_of_model_a_names_its_guide_epoch(argv, guide_epoch):
    """None given, a run of more than 20 epochs keeps the EMA of epoch 20 as its guide and a
    shorter one none (0), decided when the run starts so that its options and checkpoints say so."""
    assert resolved_options(argv).guide_epoch == guide_epoch


def test_a_resumed_run_keeps_the_guide_epoch_it_was_started_with(run_a, tmp_path):
    """run_a started with the default 100 epochs, so with the guide of epoch 20; a checkpoint whose
    options hold None for it resumes with no guide."""
    assert resolved_options(["--resume", str(run_a / "ckpt_final.pt")]).guide_epoch == 20
    older = torch.load(run_a / "ckpt_final.pt", weights_only=True)
    older["args"]["guide_epoch"] = None
    torch.save(older, tmp_path / "older.pt")
    assert resolved_options(["--resume", str(tmp_path / "older.pt")]).guide_epoch is None


def test_the_default_guide_is_the_ema_of_epoch_20(tiny_mnist, tmp_path):
    """`train.py --epochs 21`, no guide option: the checkpoints from epoch 20 on carry the EMA
    weights of epoch 20 as their guide, and options.args names it."""
    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--epochs", "21",
                "--save_freq", "20", "--save_dir", str(tmp_path)])  # 3 steps per epoch
    epoch_20, final = (load_checkpoint(str(tmp_path / name)) for name in ("ckpt_epoch_20.pt", "ckpt_final.pt"))
    assert final["args"]["guide_epoch"] == 20 and "--guide_epoch 20" in (tmp_path / "options.args").read_text()
    assert set(final["guide"]) == set(epoch_20["ema"])
    assert all(torch.equal(final["guide"][name], epoch_20["ema"][name]) for name in final["guide"])
    assert not all(torch.equal(final["guide"][name], final["ema"][name]) for name in final["ema"])


def test_guide_epoch_keeps_that_epochs_ema_for_autoguided_sampling(run_a, tiny_mnist, tmp_path, monkeypatch,
                                                                   capsys):
    """--guide_epoch 1 stores the EMA weights of the end of epoch 1 as "guide" in every later
    checkpoint, a resumed run and the exported weights included; infer.py then samples with
    autoguidance, and --guidance_scale 1 draws what the model alone draws."""
    from checkpoint import export_weights

    common = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--save_freq", "1", "--guide_epoch", "1"]
    train.main([*common, "--epochs", "3", "--save_dir", str(tmp_path / "run")])  # 3 steps per epoch
    ckpts = [load_checkpoint(str(tmp_path / "run" / name))
             for name in ("ckpt_epoch_1.pt", "ckpt_epoch_2.pt", "ckpt_final.pt")]
    for ckpt in ckpts:
        assert set(ckpt["guide"]) == set(ckpt["ema"])
        assert all(torch.equal(ckpt["guide"][name], ckpts[0]["ema"][name]) for name in ckpt["guide"])
    assert not all(torch.equal(ckpts[2]["guide"][name], ckpts[2]["ema"][name]) for name in ckpts[2]["ema"])

    train.main(["--resume", str(tmp_path / "run" / "ckpt_epoch_2.pt"), "--save_dir", str(tmp_path / "resumed")])
    resumed = load_checkpoint(str(tmp_path / "resumed" / "ckpt_final.pt"))
    assert resumed["epoch"] == 3 and all(torch.equal(resumed["guide"][n], ckpts[0]["ema"][n]) for n in resumed["guide"])
    export_weights(str(tmp_path / "run" / "ckpt_final.pt"), str(tmp_path / "weights.pt"))
    weights = load_checkpoint(str(tmp_path / "weights.pt"))
    assert all(torch.equal(weights["guide"][n], ckpts[0]["ema"][n]) for n in weights["guide"])
    # in bf16: every weight is the float32 one rounded, and the rebuilt networks (float32
    # parameters) predict what the float32 file's predict, to bf16's precision
    export_weights(str(tmp_path / "run" / "ckpt_final.pt"), str(tmp_path / "weights_bf16.pt"), dtype=torch.bfloat16)
    halved = load_checkpoint(str(tmp_path / "weights_bf16.pt"))
    for key in ("ema", "guide"):
        assert set(halved[key]) == set(weights[key])
        assert all(halved[key][n].dtype == torch.bfloat16 and torch.equal(halved[key][n], weights[key][n].bfloat16())
                   for n in weights[key])
        size = weights["model_config"]["img_size"]
        x, t = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
        rounded_net = network(halved, key)
        assert next(rounded_net.parameters()).dtype == torch.float32
        full, rounded = network(weights, key)(x, t), rounded_net(x, t)
        assert not torch.equal(full, rounded) and torch.allclose(full, rounded, rtol=0.05, atol=0.02 * full.abs().max().item())

    unguided = dict(ckpts[2])
    del unguided["guide"]
    torch.save(unguided, tmp_path / "unguided.pt")
    draw = ["--num_samples", "4", "--steps", "3"]
    infer.main(["--ckpt", str(tmp_path / "weights.pt"), "--output", str(tmp_path / "guided.png"), *draw])
    infer.main(["--ckpt", str(tmp_path / "weights.pt"), "--output", str(tmp_path / "s1.png"), *draw,
                "--guidance_scale", "1"])
    infer.main(["--ckpt", str(tmp_path / "unguided.pt"), "--output", str(tmp_path / "alone.png"), *draw])
    # scale 1 is the model alone, asked of a checkpoint with or without a guide
    infer.main(["--ckpt", str(tmp_path / "unguided.pt"), "--output", str(tmp_path / "no_guide_s1.png"), *draw,
                "--guidance_scale", "1"])
    # --guidance_max_snr 0 guides no step (every SNR(t) is above 0): the model alone again
    infer.main(["--ckpt", str(tmp_path / "weights.pt"), "--output", str(tmp_path / "snr0.png"), *draw,
                "--guidance_max_snr", "0"])
    assert (tmp_path / "s1.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    assert (tmp_path / "no_guide_s1.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    assert (tmp_path / "snr0.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    assert (tmp_path / "guided.png").read_bytes() != (tmp_path / "alone.png").read_bytes()
    # and in evaluate.py: the same samples, so the same scores, as the model alone
    scores = {}
    for name, ckpt, option in (("default", "weights.pt", []), ("snr0", "weights.pt", ["--guidance_max_snr", "0"]),
                               ("s1", "weights.pt", ["--guidance_scale", "1"]),
                               ("inf", "weights.pt", ["--guidance_max_snr", "inf"]),
                               ("no_guide_s1", "unguided.pt", ["--guidance_sweep", "1"])):
        evaluate.main(["--ckpt", str(tmp_path / ckpt), "--num_samples", "8", "--steps", "3",
                       "--data_dir", tiny_mnist, "--precision", "fp32", "--json", str(tmp_path / f"{name}.json"),
                       *option])
        report = json.loads((tmp_path / f"{name}.json").read_text(), parse_constant=pytest.fail)  # strict JSON
        scores[name] = (report["guidance_max_snr"], report["results"][0]["fid"], report["results"][0]["confidence"])
    assert scores["snr0"][0] == 0 and scores["default"][0] == DEFAULT_AUTOGUIDANCE_MAX_SNR and scores["inf"][0] == "inf"
    assert scores["snr0"][1:] == scores["s1"][1:] == scores["no_guide_s1"][1:] != scores["default"][1:]

    # a run already past the guide's epoch cannot make one; evaluate.py needs a guide to guide model A
    message = error_of(train.main, ["--resume", str(run_a / "ckpt_final.pt"), "--guide_epoch", "1", "--epochs", "3",
                                    "--save_dir", str(tmp_path / "late")], monkeypatch, capsys)
    assert "is past epoch 1 and holds no guide" in message
    message = error_of(evaluate.main, ["--ckpt", str(run_a / "ckpt_final.pt"), "--guidance_sweep", "1,2"],
                       monkeypatch, capsys)
    assert "without a guide" in message


def test_grow_epoch_stacks_the_network_keeps_a_shallow_guide_and_resumes_across_the_growth(tiny_mnist, tmp_path,
                                                                                           monkeypatch, capsys):
    """--depth 2 --grow_epoch 1: epoch 1 trains 1 block, then the checkpoints hold 2 blocks
    that start as copies of it (EMA too), with the 1-block EMA of epoch 1 as the guide and its
    config beside it. A run stopped in the 1-block epoch and resumed ends where the straight
    run ends; the guide survives export, and infer.py samples with it."""
    from checkpoint import export_weights

    common = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--save_freq", "1",
              "--grow_epoch", "1", "--guide_epoch", "1", "--epochs", "3"]  # 3 steps per epoch
    train.main([*common, "--save_dir", str(tmp_path / "straight")])
    grown = load_checkpoint(str(tmp_path / "straight" / "ckpt_epoch_1.pt"))
    assert grown["model_config"]["depth"] == 2 and grown["guide_config"] == dict(grown["model_config"], depth=1)
    for name, tensor in grown["guide"].items():  # the 1-block EMA of epoch 1, and the source of both blocks
        assert torch.equal(grown["ema"][name], tensor)
        if name.startswith("blocks.0."):
            assert torch.equal(grown["ema"]["blocks.1." + name[len("blocks.0."):]], tensor)
    assert set(grown["ema"]) - set(grown["guide"]) == {n for n in grown["ema"] if n.startswith("blocks.1.")} != set()

    train.main([*common, "--save_dir", str(tmp_path / "part"), "--max_steps", "2"])  # stops inside epoch 1
    assert load_checkpoint(str(tmp_path / "part" / "ckpt_final.pt"))["model_config"]["depth"] == 1
    message = error_of(train.main, ["--resume", str(tmp_path / "part" / "ckpt_final.pt"), "--grow_epoch", "0"],
                       monkeypatch, capsys)  # no growth would need 2 blocks now: the message says why
    assert "--depth 2 with --grow_epoch 0: 2 blocks after epoch 0 (the checkpoint's are 1)" in message
    train.main(["--resume", str(tmp_path / "part" / "ckpt_final.pt"), "--max_steps", "9"])
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt_final.pt"))
    resumed = load_checkpoint(str(tmp_path / "part" / "ckpt_final.pt"))
    assert resumed["step"] == straight["step"] == 9 and resumed["guide_config"]["depth"] == 1
    for key in ("model", "ema", "guide"):
        assert set(resumed[key]) == set(straight[key])
        for name, tensor in straight[key].items():
            assert torch.allclose(tensor, resumed[key][name], atol=1e-6), (key, name)

    export_weights(str(tmp_path / "straight" / "ckpt_final.pt"), str(tmp_path / "weights.pt"))
    weights = load_checkpoint(str(tmp_path / "weights.pt"))
    assert weights["guide_config"]["depth"] == 1 and len(network(weights, "guide").blocks) == 1
    draw = ["--ckpt", str(tmp_path / "weights.pt"), "--num_samples", "4", "--steps", "3"]
    infer.main([*draw, "--output", str(tmp_path / "guided.png")])
    infer.main([*draw, "--output", str(tmp_path / "alone.png"), "--guidance_scale", "1"])
    assert (tmp_path / "guided.png").read_bytes() != (tmp_path / "alone.png").read_bytes()


def test_guide_ema_power_averages_the_guide_over_its_epoch_and_resumes_with_it(tiny_mnist, tmp_path):
    """--guide_epoch 1 --guide_ema_power 0: the guide is the plain mean of the weights after
    steps 1, 2 and 3 (the 3 steps of epoch 1), each read from a run stopped there. A run
    stopped inside epoch 1 holds the average so far (and no guide yet); resumed, it ends with
    the straight run's guide."""
    common = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--save_freq", "1",
              "--guide_epoch", "1", "--guide_ema_power", "0", "--epochs", "2"]  # 3 steps per epoch
    train.main([*common, "--save_dir", str(tmp_path / "straight")])
    for steps in ("1", "2"):
        train.main([*common, "--save_dir", str(tmp_path / steps), "--max_steps", steps])
    part = load_checkpoint(str(tmp_path / "2" / "ckpt_final.pt"))
    assert "guide" not in part and set(part["guide_average"]) == set(part["ema"])
    models = [load_checkpoint(str(tmp_path / "1" / "ckpt_final.pt"))["model"], part["model"],
              load_checkpoint(str(tmp_path / "straight" / "ckpt_epoch_1.pt"))["model"]]
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt_final.pt"))
    assert "guide_average" not in straight
    for name, guide_weight in straight["guide"].items():
        mean = sum(model[name].double() for model in models) / 3
        assert torch.allclose(guide_weight.double(), mean, atol=1e-6), name
    assert not torch.allclose(straight["guide"]["final_layer.linear.weight"],
                              load_checkpoint(str(tmp_path / "straight" / "ckpt_epoch_1.pt"))["ema"]
                              ["final_layer.linear.weight"])  # not the EMA

    train.main(["--resume", str(tmp_path / "2" / "ckpt_final.pt"), "--max_steps", "6"])
    resumed = load_checkpoint(str(tmp_path / "2" / "ckpt_final.pt"))
    assert resumed["step"] == straight["step"] == 6
    for key in ("model", "ema", "guide"):
        for name, tensor in straight[key].items():
            assert torch.allclose(tensor, resumed[key][name], atol=1e-6), (key, name)


def test_guidance_scale_of_the_run_is_what_sampling_uses_unless_given_one(tiny_mnist, tmp_path):
    """train.py --guidance_scale 1 (1: the model alone, which makes the effect exact): the
    checkpoint keeps it, and infer.py, evaluate.py and the run's own previews draw what the
    model alone draws, while --guidance_scale 3 given to infer.py still guides."""
    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--guide_epoch", "1",
                "--guidance_scale", "1", "--epochs", "2", "--save_dir", str(tmp_path / "run")])
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt_final.pt"))
    assert ckpt["args"]["guidance_scale"] == 1 and "guide" in ckpt
    unguided = dict(ckpt)
    del unguided["guide"]
    torch.save(unguided, tmp_path / "unguided.pt")
    draw = ["--num_samples", "4", "--steps", "3", "--precision", "fp32"]
    for name, ckpt_path, option in (("default", "run/ckpt_final.pt", []), ("alone", "unguided.pt", []),
                                    ("s3", "run/ckpt_final.pt", ["--guidance_scale", "3"])):
        infer.main(["--ckpt", str(tmp_path / ckpt_path), "--output", str(tmp_path / f"{name}.png"), *draw, *option])
    assert (tmp_path / "default.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    assert (tmp_path / "s3.png").read_bytes() != (tmp_path / "alone.png").read_bytes()

    evaluate.main(["--ckpt", str(tmp_path / "run" / "ckpt_final.pt"), "--num_samples", "8", "--steps", "3",
                   "--data_dir", tiny_mnist, "--precision", "fp32", "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["results"][0]["guidance_scale"] == 1

    # the final preview: what the model alone draws (a preview of the unguided weights)
    model, scheduler, _ = load_model(str(tmp_path / "unguided.pt"))
    training.save_preview(model, scheduler, str(tmp_path / "preview_alone.png"), torch.device("cpu"), None)
    assert (tmp_path / "run" / "preview_final.png").read_bytes() == (tmp_path / "preview_alone.png").read_bytes()


def test_guidance_min_snr_of_the_run_is_where_sampling_starts_to_guide(tiny_mnist, tmp_path, monkeypatch, capsys):
    """train.py --guidance_min_snr 0.5: the checkpoint keeps it, and infer.py, evaluate.py and
    the run's own previews leave the steps with SNR(t) < 0.5 (with 3 steps t = 999 and 500; the
    guide acts on none of them, so infer's images are the model's alone) to the model, as the same
    weights without it do when given --guidance_min_snr 0.5, and unlike --guidance_min_snr 0
    (every step guided, the default)."""
    from checkpoint import build_guide

    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--guide_epoch", "1",
                "--guidance_min_snr", "0.5", "--epochs", "2", "--save_dir", str(tmp_path / "run")])
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt_final.pt"))
    assert ckpt["args"]["guidance_min_snr"] == 0.5 and "guide" in ckpt
    plain = dict(ckpt, args={k: v for k, v in ckpt["args"].items() if k != "guidance_min_snr"})
    torch.save(plain, tmp_path / "plain.pt")  # the same weights, the default interval
    draw = ["--num_samples", "4", "--steps", "3", "--precision", "fp32"]
    for name, ckpt_path, option in (("run", "run/ckpt_final.pt", []),
                                    ("given", "plain.pt", ["--guidance_min_snr", "0.5"]),
                                    ("every", "run/ckpt_final.pt", ["--guidance_min_snr", "0"]),
                                    ("plain", "plain.pt", [])):
        infer.main(["--ckpt", str(tmp_path / ckpt_path), "--output", str(tmp_path / f"{name}.png"), *draw, *option])
    image = {name: (tmp_path / f"{name}.png").read_bytes() for name in ("run", "given", "every", "plain")}
    assert image["run"] == image["given"] != image["every"] == image["plain"]

    scores = {}
    for name, ckpt_path, option in (("run", "run/ckpt_final.pt", []),
                                    ("given", "plain.pt", ["--guidance_min_snr", "0.5"]),
                                    ("every", "run/ckpt_final.pt", ["--guidance_min_snr", "0"])):
        evaluate.main(["--ckpt", str(tmp_path / ckpt_path), "--num_samples", "8", "--steps", "3",
                       "--data_dir", tiny_mnist, "--precision", "fp32", "--json", str(tmp_path / "report.json"),
                       *option])
        report = json.loads((tmp_path / "report.json").read_text())
        scores[name] = (report["guidance_min_snr"], report["results"][0]["fid"])
    assert scores["run"] == scores["given"] and scores["run"][0] == 0.5
    assert scores["every"][0] == 0 and scores["every"][1] != scores["run"][1]  # other samples, another FID

    # the final preview: the guide from SNR 0.5 on, not from the noisiest step
    model, scheduler, _ = load_model(str(tmp_path / "run" / "ckpt_final.pt"))
    guide = build_guide(ckpt)
    for min_snr in (0.5, 0.0):
        training.save_preview(model, scheduler, str(tmp_path / f"preview_{min_snr}.png"), torch.device("cpu"), None,
                              (guide, 3.0, min_snr))
    preview = (tmp_path / "run" / "preview_final.png").read_bytes()
    assert preview == (tmp_path / "preview_0.5.png").read_bytes() != (tmp_path / "preview_0.0.png").read_bytes()

    # an interval that guides no step is refused in one line
    message = error_of(infer.main, ["--ckpt", str(tmp_path / "run" / "ckpt_final.pt"), "--output",
                                    str(tmp_path / "x.png"), "--guidance_max_snr", "0.1"], monkeypatch, capsys)
    assert "no step would be guided: the lower SNR bound 0.5" in message


def test_resume_continues_from_the_saved_step(run_a, tiny_mnist, tmp_path):
    run_script("train.py", "--data_dir", tiny_mnist, "--save_dir", str(tmp_path),
               "--resume", str(run_a / "ckpt_final.pt"), "--max_steps", "6", *TINY_RUN)
    ckpt = load_checkpoint(str(tmp_path / "ckpt_final.pt"))
    first = load_checkpoint(str(run_a / "ckpt_final.pt"))
    assert ckpt["step"] == 6 and ckpt["ema_updates"] == 6
    assert not torch.equal(ckpt["model"]["final_layer.linear.weight"],
                           first["model"]["final_layer.linear.weight"])


def test_resume_equals_an_uninterrupted_run(tiny_mnist, tmp_path):
    """4 steps, stop, resume to 7 == 7 steps straight (same data order, noise and EMA)."""
    common = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32"]
    run_script("train.py", *common, "--save_dir", str(tmp_path / "straight"), "--max_steps", "7")
    run_script("train.py", *common, "--save_dir", str(tmp_path / "part"), "--max_steps", "4")
    run_script("train.py", *common, "--save_dir", str(tmp_path / "part"), "--max_steps", "7",
               "--resume", str(tmp_path / "part" / "ckpt_final.pt"))
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt_final.pt"))
    resumed = load_checkpoint(str(tmp_path / "part" / "ckpt_final.pt"))
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.allclose(tensor, resumed[key][name], atol=1e-6), (key, name)


def test_compiled_training_follows_the_eager_run(tiny_mnist, tmp_path):
    """--compile (the CPU recipes use it) trains the same model as eager code: 3 steps from the
    same seed (batches of 16, 16 and the epoch's last 8) end at the same weights up to float
    rounding, saved under the plain names; the smaller batch compiles no second graph."""
    common = ["--data_dir", tiny_mnist, *TINY_RUN, "--subset", "40", "--precision", "fp32",
              "--max_steps", "3", "--prediction", "v"]
    run_script("train.py", *common, "--save_dir", str(tmp_path / "eager"))
    result = run_script("train.py", *common, "--save_dir", str(tmp_path / "compiled"), "--compile",
                        env={"TORCH_LOGS": "recompiles"})
    assert "Recompiling" not in result.stderr, result.stderr
    eager = load_checkpoint(str(tmp_path / "eager" / "ckpt_final.pt"))
    compiled = load_checkpoint(str(tmp_path / "compiled" / "ckpt_final.pt"))
    assert set(compiled["model"]) == set(eager["model"])
    for name, tensor in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], tensor, rtol=0, atol=1e-4)
    assert compiled["model"]["final_layer.linear.weight"].abs().sum() > 0  # zero at the start: it trained


def test_resume_alone_continues_the_run_with_its_own_options(tiny_mnist, tmp_path, monkeypatch, capsys):
    """`--resume CKPT` without the run's other options (data, batch, lr, EMA, save_dir...) takes
    them from the checkpoint and ends where the uninterrupted run ends; an option given again
    overrides, but one that would change the model or cut the interrupted epoch's batches
    differently is refused."""
    recipe = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--lr", "5e-3",
              "--ema_decay", "0.9", "--seed", "3"]
    run_script("train.py", *recipe, "--save_dir", str(tmp_path / "straight"), "--max_steps", "7")
    part = tmp_path / "part"
    run_script("train.py", *recipe, "--save_dir", str(part), "--max_steps", "4")
    first = load_checkpoint(str(part / "ckpt_final.pt"))
    assert first["batch_in_epoch"] == 1  # 48 images / 16 per batch: step 4 is inside epoch 2

    message = error_of(train.main, ["--resume", str(part / "ckpt_final.pt"), "--batch_size", "8"],
                       monkeypatch, capsys)
    assert "middle of an epoch" in message and "batch_size 16 -> 8" in message
    message = error_of(train.main, ["--resume", str(part / "ckpt_final.pt"), "--dim", "64"], monkeypatch, capsys)
    assert "--dim 64 (the checkpoint's is 32)" in message  # the model is the checkpoint's

    run_script("train.py", "--resume", str(part / "ckpt_final.pt"), "--max_steps", "7")
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt_final.pt"))
    resumed = load_checkpoint(str(part / "ckpt_final.pt"))  # the run's own save_dir
    assert resumed["step"] == 7 and resumed["args"]["lr"] == 5e-3 and resumed["args"]["batch_size"] == 16
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.allclose(tensor, resumed[key][name], atol=1e-6), (key, name)


def test_corrupt_or_wrong_checkpoint_gives_one_line_error(run_a, run_b, tmp_path, monkeypatch, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((run_a / "ckpt_final.pt").read_bytes()[:1000])
    out = ["--output", str(tmp_path / "x.png")]
    for main, args, expected in (
        (infer.main, ["--ckpt", str(corrupt)], "not a readable checkpoint"),
        (infer.main, ["--ckpt", str(tmp_path / "missing.pt")], "not found"),
        (infer.main, ["--ckpt", str(run_b / "ckpt_final.pt")], "model B"),
        (infer_cfg.main, ["--label", "3", "--ckpt", str(run_a / "ckpt_final.pt")], "model A"),
    ):
        assert expected in error_of(main, [*args, *out], monkeypatch, capsys)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(corrupt))
    # and once through a real process: one line on stderr, no traceback
    result = run_script("infer.py", "--ckpt", str(corrupt), *out, check=False)
    assert result.returncode != 0 and "not a readable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # a bad option too: argparse's exit status 2, one line rather than the whole usage block
    result = run_script("infer.py", "--ckpt", str(corrupt), *out, "--num_samples", "0", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--num_samples: must be a positive integer" in result.stderr and "--help" in result.stderr


@pytest.mark.parametrize("args,expected", [
    (["--num_samples", "0"], "positive integer"),
    (["--steps", "5000"], "more than the 1000 timesteps"),
    (["--sampler", "euler"], "invalid choice"),
    (["--eta", "0.5", "--sampler", "dpm++2m"], "DDIM option"),
    (["--variance", "beta", "--sampler", "ddim"], "DDPM option"),
    (["--output", "/nonexistent/dir/x.png"], "does not exist"),
    (["--output", "x.unknownext"], "image format"),
    (["--guidance_scale", "2"], "without a guide"),
    (["--guidance_scale", "0"], "without a guide"),
    (["--guidance_max_snr", "2"], "without a guide"),
    (["--guidance_max_snr", "-1"], "must be a number >= 0 or inf"),
    (["--guidance_min_snr", "0.02"], "without a guide"),
    (["--guidance_min_snr", "nan"], "must be a number >= 0 or inf"),
])
def test_bad_inference_options(run_a, args, expected, tmp_path, monkeypatch, capsys):
    if "--output" not in args:
        args = [*args, "--output", str(tmp_path / "x.png")]
    assert expected in error_of(infer.main, ["--ckpt", str(run_a / "ckpt_final.pt"), *args],
                                monkeypatch, capsys)


def fail_if_called(what):
    """A stand-in for expensive work that a bad option must stop before."""
    def fail(*args, **kwargs):
        pytest.fail(f"{what} although an option was bad")
    return fail


@pytest.mark.parametrize("main,args,expected", [
    (train.main, ["--img_size", "30", "--patch_size", "4"], "divisible by patch_size"),
    (train.main, ["--num_workers", "-1"], "must be an integer >= 0"),
    (train_cfg.main, ["--cond_tokens", "1"], "cond_tokens must be an integer >= 2"),
    (train.main, ["--importance_sampling", "--min_snr_gamma", "0"],
     "needs --loss_weighting p2 or --min_snr_gamma above 0"),
    (train.main, ["--epochs", "3", "--guide_epoch", "3"], "must be less than --epochs 3"),
    (train.main, ["--adam_beta2", "1"], "must be in [0, 1), got 1"),
    (train.main, ["--epochs", "3", "--grow_epoch", "3"], "must be less than --epochs 3"),
    (train.main, ["--depth", "3", "--grow_epoch", "1"], "needs an even --depth (not 3)"),
    (train.main, ["--guide_epoch", "0", "--guide_ema_power", "2"],
     "--guide_ema_power sets how the guide of --guide_epoch is averaged, but this run keeps no guide"),
    (train.main, ["--guide_epoch", "1", "--guide_ema_power", "-1"], "must be a finite number >= 0 or none, got -1"),
    (train.main, ["--epochs", "20", "--guidance_scale", "4"],  # too short for the default guide
     "--guidance_scale sets the scale sampling uses with the guide of --guide_epoch, but this run keeps no guide: "
     "give --guide_epoch K above 0 (none given: 20 where --epochs is above 20)"),
    (train.main, ["--guide_epoch", "1", "--guidance_scale", "-1"], "must be a finite number >= 0 or none, got -1"),
    (train.main, ["--guide_epoch", "0", "--guidance_min_snr", "0.02"],
     "--guidance_min_snr sets where sampling starts to use the guide of --guide_epoch, but this run keeps no guide"),
    (train.main, ["--guide_epoch", "1", "--guidance_min_snr", "5"],
     "--guidance_min_snr 5 is above the SNR 4 where sampling stops guiding"),
    # a save_dir that cannot be created: its parent, or the path itself, is a regular file
    (train.main, ["--save_dir", "{tmp}/a_file/run"], "cannot write files in the output directory"),
    (train.main, ["--save_dir", "{tmp}/a_file"], "cannot write files in the output directory"),
], ids=["model_shape", "num_workers", "cond_tokens", "importance_sampling_without_weights", "guide_epoch_too_late",
        "adam_beta2_of_1", "grow_epoch_too_late", "grow_epoch_odd_depth",
        "guide_ema_power_without_guide_epoch", "guide_ema_power_negative", "guidance_scale_without_guide_epoch",
        "guidance_scale_negative", "guidance_min_snr_without_guide_epoch", "guidance_min_snr_above_max",
        "save_dir_under_a_file", "save_dir_is_a_file"])
def test_bad_training_options_stop_before_the_data_is_read(main, args, expected, tiny_mnist, tmp_path,
                                                           monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setattr(training, "load_training_set", fail_if_called("MNIST was read"))
    args = [arg.format(tmp=tmp_path) for arg in args]
    message = error_of(main, ["--data_dir", tiny_mnist, "--save_dir", str(tmp_path / "run"),
                              *TINY_RUN, "--max_steps", "1", *args], monkeypatch, capsys)
    assert expected in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the "
                    "save_dir cases under a regular file above cover root")
def test_read_only_save_dir_stops_before_the_data_is_read(tiny_mnist, tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    monkeypatch.setattr(training, "load_training_set", fail_if_called("MNIST was read"))
    message = error_of(train.main, ["--data_dir", tiny_mnist, "--save_dir", str(read_only),
                                    *TINY_RUN, "--max_steps", "1"], monkeypatch, capsys)
    assert "cannot write files in the output directory" in message


def test_missing_mnist_is_one_line(tmp_path):
    result = run_script("train.py", "--data_dir", str(tmp_path / "empty"), "--save_dir",
                        str(tmp_path), *TINY_RUN, check=False,
                        env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    assert result.returncode != 0
    assert "MNIST/raw" in result.stderr and "--data_dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_cfg_train_and_infer_label_and_grid(run_b, tmp_path):
    ckpt = str(run_b / "ckpt_final.pt")
    assert load_checkpoint(ckpt)["kind"] == "class_conditional"
    preview = Image.open(run_b / "preview_final.png")
    assert preview.size[1] == 2 + 10 * 18  # one row per digit
    run_script("infer_cfg.py", "--ckpt", ckpt, "--output", str(tmp_path / "four.jpg"),
               "--label", "4", "--steps", "3")
    assert Image.open(tmp_path / "four.jpg").size == (16, 16)
    infer_cfg.main(["--ckpt", ckpt, "--output", str(tmp_path / "all.png"), "--label", "all",
                    "--num_samples", "2", "--steps", "3"])
    assert Image.open(tmp_path / "all.png").size == (2 + 2 * 18, 2 + 10 * 18)
    infer_cfg.main(["--ckpt", ckpt, "--output", str(tmp_path / "all3.png"), "--label", "all",
                    "--num_samples", "2", "--steps", "3", "--scale", "3"])
    small, large = Image.open(tmp_path / "all.png"), Image.open(tmp_path / "all3.png")
    assert large.size == (3 * small.size[0], 3 * small.size[1])
    assert large.resize(small.size, Image.NEAREST).tobytes() == small.tobytes()  # each pixel a 3x3 block
    infer_cfg.main(["--ckpt", ckpt, "--output", str(tmp_path / "fours") + "/", "--label", "4",
                    "--num_samples", "2", "--steps", "2"])
    assert sorted(os.listdir(tmp_path / "fours")) == ["4_000.png", "4_001.png"]


@pytest.mark.parametrize("args,expected", [
    *((["--label", label], "0-9") for label in ("10", "-1", "four", "3.5")),
    *((["--label", "3", "--guidance_scale", scale], "finite number >= 0")
      for scale in ("nan", "inf", "-1")),
])
def test_bad_cfg_inference_options(run_b, args, expected, tmp_path, monkeypatch, capsys):
    message = error_of(infer_cfg.main, ["--ckpt", str(run_b / "ckpt_final.pt"), "--output",
                                        str(tmp_path / "x.png"), *args], monkeypatch, capsys)
    assert expected in message


@pytest.mark.parametrize("args,expected", [
    (["--trajectory_columns", "1"], "at least 2"),
    (["--steps", "5000"], "more than the 1000 timesteps"),
    (["--outdir", "{tmp}/a_file"], "cannot write files in the output directory"),
])
def test_bad_figures_options(run_a, args, expected, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setattr(figures, "sample", fail_if_called("sampling started"))
    args = [arg.format(tmp=tmp_path) for arg in args]
    message = error_of(figures.main, ["--ckpt", str(run_a / "ckpt_final.pt"),
                                      "--outdir", str(tmp_path / "figures"), *args], monkeypatch, capsys)
    assert expected in message


@pytest.mark.parametrize("json_path,expected", [
    ("{tmp}/a_file/report.json", "a_file is a file"),   # its folder can never be created
    ("{tmp}", "output is a directory"),
])
def test_bad_evaluate_json_stops_before_any_work(json_path, expected, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setattr(evaluate, "evaluate", fail_if_called("evaluation started"))
    monkeypatch.setattr(evaluate, "load_or_train_classifier", fail_if_called("the classifier was loaded"))
    message = error_of(evaluate.main, ["--ckpt", "any.pt", "--json", json_path.format(tmp=tmp_path)],
                       monkeypatch, capsys)
    assert expected in message


@pytest.mark.parametrize("device,expected", [
    ("mps", "--device mps"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="here CUDA is available, so --device cuda is valid")),
])
def test_ddp_rejects_a_device_as_train_cfg_does(device, expected, tmp_path, monkeypatch, capsys):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train_cfg_ddp.torch_dist, "init_process_group",
                        fail_if_called("the process group was joined"))
    args = ["--device", device, "--save_dir", str(tmp_path)]
    ddp_message = error_of(train_cfg_ddp.main, args, monkeypatch, capsys)
    assert expected in ddp_message
    if device == "cuda" or not torch.backends.mps.is_available():
        # the same message as the single-process script's
        assert ddp_message == error_of(train_cfg.main, args, monkeypatch, capsys)


@pytest.mark.parametrize("device, local_rank, expected", [
    ("cuda:0", "0", "each process uses cuda:LOCAL_RANK"),     # an index would be ignored
    ("cuda", "1", "LOCAL_RANK 1 but 1 GPU(s) visible"),       # more processes than GPUs
])
def test_ddp_on_cuda_wants_one_gpu_per_process(device, local_rank, expected, tmp_path, monkeypatch, capsys):
    """On a machine made to look like it has one GPU: both mistakes stop with one line before
    any GPU is claimed or the process group joined."""
    for name, value in (("RANK", local_rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", fail_if_called("a GPU was claimed"))
    monkeypatch.setattr(train_cfg_ddp.torch_dist, "init_process_group",
                        fail_if_called("the process group was joined"))
    message = error_of(train_cfg_ddp.main, ["--device", device, "--save_dir", str(tmp_path)], monkeypatch, capsys)
    assert expected in message


def test_figures_guidance_sweep_and_trajectory(run_b, tmp_path):
    import figures
    figures.main(["--ckpt", str(run_b / "ckpt_final.pt"), "--outdir", str(tmp_path), "--steps", "4",
                  "--scales", "0,2", "--trajectory_columns", "3", "--trajectory_samples", "2"])
    # pictures at 3x by default (--scale 3)
    assert Image.open(tmp_path / "guidance_sweep.png").size == (3 * (2 + 2 * 18), 3 * (2 + 10 * 18))
    strip = Image.open(tmp_path / "trajectory.png")
    assert strip.size == (3 * (2 + 3 * 18), 3 * (2 + 2 * 2 * 18))  # 3 timesteps; x_t and x0_hat rows for 2 samples


@pytest.mark.parametrize("recipe", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_recipes_parse_to_what_they_say(recipe):
    """Every recipe is read by its script's parser (comments skipped), each of its lines ends
    up in the options with the value written there, and a later flag overrides it."""
    path = os.path.join(ROOT, "configs", recipe)
    with open(path) as f:
        script = re.search(r"python (\w+)\.py @configs/" + re.escape(recipe), f.read()).group(1)
    build_parser = {"train": train.build_parser, "train_cfg": train_cfg.build_parser}[script]
    args = build_parser().parse_args([f"@{path}"])
    written = {}
    with open(path) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields:
                assert len(fields) in (1, 2) and fields[0].startswith("--"), line
                written[fields[0][2:]] = fields[1] if len(fields) == 2 else None  # None: a flag
    assert written, "a recipe sets something"
    for name, text in written.items():
        value = getattr(args, name)
        assert value is True if text is None else value == type(value)(text), (name, text, value)
    assert build_parser().parse_args([f"@{path}", "--epochs", "1"]).epochs == 1
    if getattr(args, "grow_epoch", None):  # and --grow_epoch 0 turns the growth off: the full depth from the start
        off = build_parser().parse_args([f"@{path}", "--grow_epoch", "0"])
        assert training.depth_at(args, 0) == args.depth // 2 and training.depth_at(off, 0) == off.depth
    if getattr(args, "guide_ema_power", None) is not None:  # and none turns it off: the EMA is the guide
        assert build_parser().parse_args([f"@{path}", "--guide_ema_power", "none"]).guide_ema_power is None
    for option in ("guidance_scale", "guidance_min_snr"):  # and none gives sampling's default back
        if getattr(args, option, None) is not None:
            assert getattr(build_parser().parse_args([f"@{path}", f"--{option}", "none"]), option) is None


def start_script(args, marker, timeout=120):
    """Start a repo script with unbuffered output; once a stdout line contains `marker`, return
    (process, stdout lines, stderr lines, reader threads). The threads keep draining both
    streams (tqdm's progress on stderr would otherwise fill the pipe and stall the script)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out, err, seen = [], [], threading.Event()

    def pump(stream, lines, watch):
        for line in stream:
            lines.append(line)
            if watch and marker in line:
                seen.set()
        if watch:
            seen.set()  # end of output: stop waiting (the caller sees the marker missing)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, False), daemon=True)]
    for thread in threads:
        thread.start()
    if not seen.wait(timeout) or not any(marker in line for line in out):
        proc.kill()
        proc.wait()
        raise AssertionError(f"{args}: no {marker!r} within {timeout} s:\n{''.join(out)}\n{''.join(err)}")
    return proc, out, err, threads


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_mnist, tmp_path):
    """Ctrl-C (SIGINT) during training finishes the current step, writes ckpt_interrupted.pt,
    says how to resume and exits with status 0 (README "Training"); resuming from it ends with
    the same weights as a run that was never interrupted."""
    common = ["train.py", "--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--save_freq", "1000",
              "--epochs", "1000000"]  # far more steps than the test waits for: only Ctrl-C ends it
    save_dir = tmp_path / "interrupted"
    # training.train() installs its SIGINT handler just before it logs "training model A (...)"
    proc, out, err, threads = start_script([*common, "--save_dir", str(save_dir), "--max_steps", "100000"],
                                           marker="training model A (")
    proc.send_signal(signal.SIGINT)
    try:
        returncode = proc.wait(timeout=120)
    finally:
        proc.kill()  # a no-op once it has exited
    for thread in threads:
        thread.join(10)
    stdout, stderr = "".join(out), "".join(err)
    assert returncode == 0, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "stopping: saving a resumable checkpoint" in stderr
    interrupted = save_dir / "ckpt_interrupted.pt"
    assert f"--resume {interrupted}" in stdout, stdout
    # no final checkpoint, no temp file
    assert sorted(os.listdir(save_dir)) == ["ckpt_interrupted.pt", "metrics.csv", "options.args"]

    ckpt = load_checkpoint(str(interrupted))
    step = ckpt["step"]
    assert 1 <= step < 100000 and ckpt["ema_updates"] == step  # the step under way was finished
    steps_per_epoch = 48 // 16  # --subset 48, --batch_size 16
    assert ckpt["epoch"] * steps_per_epoch + ckpt["batch_in_epoch"] == step

    run_script(*common, "--save_dir", str(save_dir), "--max_steps", str(step + 2), "--resume", str(interrupted))
    resumed = load_checkpoint(str(save_dir / "ckpt_final.pt"))
    assert resumed["step"] == step + 2 and resumed["ema_updates"] == step + 2
    run_script(*common, "--save_dir", str(tmp_path / "straight"), "--max_steps", str(step + 2))
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt_final.pt"))
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.allclose(tensor, resumed[key][name], atol=1e-6), (key, name)


def test_lr_decay_counts_epochs_when_a_run_resumes_with_another_batch_size(tiny_mnist, tmp_path):
    """Two epochs of 3 steps (batch 16), then resumed with batch 48 (1 step per epoch): the third
    epoch's lr is lr * 0.5^2, as for any batch size. Counting decays by steps of the new run's
    length would give 0.5^6. The value checked is the one the optimizer used, so a loop that
    computed the lr without applying it fails too."""
    run = tmp_path / "run"
    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--save_dir", str(run),
                "--epochs", "2", "--warmup_steps", "0", "--lr", "1e-3", "--lr_decay_step", "1"])
    first = load_checkpoint(str(run / "ckpt_final.pt"))
    assert (first["epoch"], first["step"]) == (2, 6)
    assert first["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5)  # epoch 2's
    train.main(["--resume", str(run / "ckpt_final.pt"), "--batch_size", "48", "--epochs", "3"])
    resumed = load_checkpoint(str(run / "ckpt_final.pt"))
    assert (resumed["epoch"], resumed["step"]) == (3, 7)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)


def test_adam_beta2_reaches_the_optimizer_and_a_resume_keeps_or_overrides_it(tiny_mnist, tmp_path):
    """The betas the optimizer stepped with are read from the saved optimizer state: the run's
    --adam_beta2, the same again after `--resume` alone, and the new value when it is given with
    the resume (the saved state's own betas must not win over the option)."""
    run = tmp_path / "run"
    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--save_dir", str(run),
                "--max_steps", "2", "--adam_beta2", "0.95"])

    def betas():
        ckpt = load_checkpoint(str(run / "ckpt_final.pt"))
        return ckpt["step"], ckpt["args"]["adam_beta2"], tuple(ckpt["optimizer"]["param_groups"][0]["betas"])

    assert betas() == (2, 0.95, (0.9, 0.95))
    train.main(["--resume", str(run / "ckpt_final.pt"), "--max_steps", "3"])
    assert betas() == (3, 0.95, (0.9, 0.95))
    train.main(["--resume", str(run / "ckpt_final.pt"), "--max_steps", "4", "--adam_beta2", "0.99"])
    assert betas() == (4, 0.99, (0.9, 0.99))


def test_each_epoch_reads_the_data_in_its_own_seeded_order(tiny_mnist, tmp_path, monkeypatch):
    """Epoch e visits the images in the order torch.randperm(N) draws from a generator seeded
    with seed + e (DistributedSampler's rule), batch by batch: a new order every epoch, the same
    for the same seed. A loop that forgot set_epoch would repeat epoch 0's order."""
    from data import load_training_set, to_model_range
    seen = []
    real_step = training.training_step

    def recording_step(model, scheduler, optimizer, x0, *args, **kwargs):
        seen.append(x0.clone())
        return real_step(model, scheduler, optimizer, x0, *args, **kwargs)

    monkeypatch.setattr(training, "training_step", recording_step)
    train.main(["--data_dir", tiny_mnist, *TINY_RUN, "--save_dir", str(tmp_path), "--epochs", "2",
                "--seed", "5"])
    images = to_model_range(load_training_set(tiny_mnist, 16, 1, subset=48)[0], "cpu")
    expected = []
    for epoch in range(2):
        order = torch.randperm(48, generator=torch.Generator().manual_seed(5 + epoch))
        expected += [images[order[i:i + 16]] for i in range(0, 48, 16)]
    assert len(seen) == len(expected) == 6
    for step, (batch, batch_expected) in enumerate(zip(seen, expected)):
        assert torch.equal(batch, batch_expected), step


def read_metrics(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_and_options_file_survive_a_resume(tiny_mnist, tmp_path):
    """metrics.csv gets a row at each epoch's end (3 steps here) and where the run stops; a run
    resumed from an earlier checkpoint drops the rows past it and goes on, with no step missing
    or repeated and the elapsed time carried on. options.args reruns the same recipe."""
    run = tmp_path / "run"
    recipe = ["--data_dir", tiny_mnist, *TINY_RUN, "--precision", "fp32", "--lr", "4e-3",
              "--lr_decay_step", "2", "--save_freq", "1", "--epochs", "5"]
    train.main([*recipe, "--save_dir", str(run), "--max_steps", "7"])
    assert [row["step"] for row in read_metrics(run / "metrics.csv")] == ["3", "6", "7"]
    # as if the run had died after step 7 and were resumed from its epoch-2 checkpoint
    train.main(["--resume", str(run / "ckpt_epoch_2.pt"), "--max_steps", "12"])
    rows = read_metrics(run / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [3, 6, 9, 10, 12]  # 10: every LOG_EVERY steps
    assert [row["epoch"] for row in rows] == ["1.0000", "2.0000", "3.0000", "3.3333", "4.0000"]
    for row in rows:  # the lr each row ends with: warm-up of 2 steps, halved every 2 epochs
        epochs_done = math.ceil(float(row["epoch"])) - 1
        assert float(row["lr"]) == pytest.approx(4e-3 * 0.5 ** (epochs_done // 2), rel=1e-5), row
        assert 0 < float(row["loss"]) < 3 and float(row["img_per_s"]) > 0
    elapsed = [float(row["elapsed_s"]) for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0

    args = train.build_parser().parse_args([f"@{run / 'options.args'}"])
    assert vars(args) == dict(load_checkpoint(str(run / "ckpt_final.pt"))["args"], resume=None)
    assert args.max_steps == 12 and args.lr == 4e-3 and args.data_dir == tiny_mnist
    assert args.guide_epoch == 0  # 5 epochs: too short for the default guide, and the file says so


@pytest.mark.parametrize("main,expected", [
    (train.main, ["--lr LR", "(default: 0.0002)", "--timesteps TIMESTEPS", "(default: 1000)"]),
    (infer_cfg.main, ["--guidance_scale GUIDANCE_SCALE", "(default: 3.0)", "model_b.pt)"]),
    (evaluate.main, ["--num_samples NUM_SAMPLES", "(default: 1000)"]),
])
def test_help_shows_the_defaults(main, expected, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for piece in expected:
        assert piece in text
