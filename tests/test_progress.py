"""Progress bars (progress.py): live on a terminal, a line now and then in a log."""

from __future__ import annotations

import io
import time

from sharpkd.progress import LOG_INTERVAL_S, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _redraws(out: io.StringIO) -> int:
    for _ in progress(range(30), file=out, desc="work"):
        time.sleep(0.04)
    return out.getvalue().count("\r")


def test_off_a_terminal_the_bar_is_redrawn_rarely():
    assert LOG_INTERVAL_S >= 5
    assert _redraws(io.StringIO()) <= 3  # the start, the end: not a line per step in CI or queue logs
    assert _redraws(Terminal()) >= 8  # a terminal still gets a live bar


def test_training_writes_a_few_progress_lines_not_one_per_step(capsys):
    import torch

    from helpers import loss_params
    from sharpkd.losses import DistillObjective
    from sharpkd.models.student import Student
    from sharpkd.train import FitConfig, fit

    def batch(step):
        g = torch.Generator().manual_seed(step)
        return {"input": torch.rand(2, 3, 8, 8, generator=g), "hr": torch.rand(2, 3, 8, 8, generator=g)}

    student = Student(scale=2, channels=4, blocks=1)
    fit(DistillObjective(student, loss_params(kd=0)), batch, FitConfig(steps=60, lr=1e-3), desc="fit")
    assert capsys.readouterr().err.count("\r") <= 4  # the loss in the bar no longer redraws it each step
