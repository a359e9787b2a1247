"""Small shared helpers: the autocast dtype the training step and the sampler use, option
types, sample file names, the malloc setting every script runs with."""
import argparse
import platform

import pytest
import torch

from cli import run_main
from images import OutputError, check_output_dir, check_output_file, sample_names
from options import nonnegative_float, nonnegative_float_or_none, nonnegative_int
from sampling import generate_images
from scheduler import NoiseScheduler
from tests.conftest import run_script
from training import training_step


class AutocastRecorder(torch.nn.Module):
    """A stand-in noise predictor that notes, at every call, the autocast state it runs under."""

    channels, img_size = 1, 4

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # something for the optimizer to step
        self.seen = []

    def forward(self, x, t):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return x * self.scale


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_the_given_amp_dtype_is_the_autocast_dtype(amp_dtype):
    model = AutocastRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training_step(model, NoiseScheduler(timesteps=50), optimizer, torch.zeros(2, 1, 4, 4),
                  amp_dtype=amp_dtype)
    generate_images(model, NoiseScheduler(timesteps=50), 2, sampler="ddim", steps=2,
                    amp_dtype=amp_dtype)
    assert model.seen == [(True, amp_dtype)] * 3  # one training forward, two sampling steps


def test_no_amp_dtype_means_no_autocast():
    model = AutocastRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training_step(model, NoiseScheduler(timesteps=50), optimizer, torch.zeros(2, 1, 4, 4))
    generate_images(model, NoiseScheduler(timesteps=50), 2, sampler="ddim", steps=2)
    assert [enabled for enabled, _ in model.seen] == [False] * 3


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-0.5"])
def test_nonnegative_float_rejects_what_is_not_a_finite_number_at_least_zero(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite number >= 0"):
        nonnegative_float(text)


@pytest.mark.parametrize("text", ["nan", "inf", "-0.5", "nothing"])
def test_nonnegative_float_or_none_reads_none_and_refuses_the_rest(text):
    assert nonnegative_float_or_none("none") is None and nonnegative_float_or_none("None") is None
    assert nonnegative_float_or_none("0") == 0.0 and nonnegative_float_or_none("2") == 2.0
    with pytest.raises(argparse.ArgumentTypeError, match="finite number >= 0 or none"):
        nonnegative_float_or_none(text)


def test_nonnegative_types_accept_zero_and_up():
    assert nonnegative_float("0") == 0.0 and nonnegative_float("2.5") == 2.5
    assert nonnegative_int("0") == 0 and nonnegative_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="integer >= 0"):
        nonnegative_int("-1")


def test_sample_names_sort_in_sample_order():
    assert sample_names(3) == ["000", "001", "002"]
    assert sample_names(2, prefix="4_") == ["4_000", "4_001"]
    names = sample_names(1001)
    assert names[0] == "0000" and names[-1] == "1000" and sorted(names) == names


def test_ctrl_c_outside_training_exits_with_the_sigint_status(capsys):
    """Ctrl-C while a script loads data or samples: one line and status 130, no traceback."""
    def interrupted_main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_main(interrupted_main)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_progress_shows_the_batches_and_changes_no_sample(capsys):
    model = AutocastRecorder()
    quiet = generate_images(model, NoiseScheduler(timesteps=50), 5, sampler="ddim", steps=2, batch_size=2)
    shown = generate_images(model, NoiseScheduler(timesteps=50), 5, sampler="ddim", steps=2, batch_size=2,
                            progress=True)
    assert torch.equal(quiet, shown)
    err = capsys.readouterr().err
    assert "batches: 100%" in err and "3/3" in err  # 5 images in batches of 2


def test_output_checks_create_nothing(tmp_path):
    """A run that fails a later check must not leave empty folders behind."""
    check_output_dir(str(tmp_path / "new" / "run"))
    check_output_file(str(tmp_path / "other" / "report.json"), missing_folder_ok=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="does not exist"):
        check_output_file(str(tmp_path / "other" / "report.json"))


# A step's worth of allocations: 16 blocks of 4 MiB written and freed, five times over; prints
# the page faults of the last four rounds. Run in a fresh process, since malloc's settings are
# the process's.
_FAULTS_PER_ROUND = """
import resource, sys
import torch
from cli import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def one_round():
    blocks = [torch.ones(1 << 20) for _ in range(16)]
    del blocks
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def test_keep_freed_memory_stops_a_step_from_faulting_its_pages_in_again():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory tunes glibc's malloc")
    faults = {mode: float(run_script("-c", _FAULTS_PER_ROUND, mode).stdout.split()[-1])
              for mode in ("default", "keep")}
    # 64 MiB written per round is 16,384 pages of 4 KiB. By default glibc hands a share of
    # them back at each free and faults them in again (4,300 or 16,400 per round on 2 Zen 5
    # cores, from run to run); kept, they are reused (256)
    assert faults["keep"] < 1024
    assert faults["keep"] < faults["default"] / 8


def test_every_script_keeps_freed_memory(monkeypatch):
    import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    run_main(lambda: None)
    assert calls == [True]
