"""The training progress bar is drawn over the bound that will end the run: the time budget when the epochs would not
fit in it, the epochs otherwise, decided again after every epoch from the mean epoch time so far."""
from __future__ import annotations

import time

from trainer.config import TrainConfig
from trainer.train import Progress


def _bar(capsys, epochs: int, budget: float | None, seconds_per_epoch: float, done: int) -> tuple[Progress, str]:
    """A bar whose run started ``done * seconds_per_epoch`` s ago, after ``done`` epochs; and what it drew."""
    start = time.perf_counter() - done * seconds_per_epoch
    p = Progress(TrainConfig(epochs=epochs, time_budget_s=budget), False, start)
    for e in range(1, done + 1):
        p.epoch_done(e, loss="1.0")
    p.close()
    return p, capsys.readouterr().err


def test_time_budget_is_the_bound_when_the_epochs_do_not_fit(capsys):
    p, drawn = _bar(capsys, 40, 150.0, 20.0, 1)            # 40 epochs x 20 s >> 150 s: the budget ends it
    assert p.by_time and p.bar.total == 150 and p.bar.unit == "s"
    assert p.bar.n == 20 and "150 s budget" in drawn and "epoch=1/40" in drawn


def test_epochs_are_the_bound_when_they_fit_in_the_budget(capsys):
    p, drawn = _bar(capsys, 5, 150.0, 2.0, 2)              # 5 epochs x 2 s = 10 s < 150 s: the epochs end it
    assert not p.by_time and p.bar.total == 5 and p.bar.unit == "epoch" and p.bar.n == 2
    assert "train (5 epochs)" in drawn


def test_without_a_budget_the_bar_counts_epochs(capsys):
    p, drawn = _bar(capsys, 3, None, 1.0, 3)
    assert not p.by_time and p.bar.total == 3 and p.bar.n == 3 and "train (3 epochs)" in drawn
