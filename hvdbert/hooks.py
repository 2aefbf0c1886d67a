"""Step hooks: the training loop's side concerns, as one explicit list the caller passes to `train()`.

Checkpointing (`checkpoint.Checkpointer`), held-out evaluation (`evaluate.Evaluator`), the sample-id
logs (`rundir.SampleLog`), an elastic job's commits and a benchmark's clock each subclass `StepHook`
and override the points they need; `train()` calls every hook of its list, in list order, at each
point. There is no registry: what runs is what the caller put in the list (STYLE.md, rule 5).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvdbert.run import Run
    from hvdbert.train import StepResult


class StepHook:
    """One side concern of the loop. Every method does nothing unless a subclass overrides it."""

    def after_step(self, run: Run, result: StepResult) -> None:
        """Every step, right after it ran, before it is logged (a step that stops the run included)."""

    def log_due(self, run: Run) -> bool:
        """Whether this step must be logged even off train.log_every (an evaluation due now)."""
        return False

    def on_log(self, run: Run, record: dict) -> None:
        """A logged step: add figures to its metrics record before it is written."""

    def step_end(self, run: Run) -> None:
        """After a step the run goes on from (not one that stops it): periodic saves, commits. Runs
        last in the step, so a hook that leaves the loop (an elastic commit noticing a new host)
        leaves nothing of the step undone."""

    def diverged(self, run: Run) -> str | None:
        """The run diverged and is about to stop with an error; what to name in that error (a
        diagnostic checkpoint's path), or None."""
        return None

    def run_end(self, run: Run, stopped: bool) -> None:
        """The loop ended: at the plan's last step, or `stopped` by an agreed stop request."""

    def summary(self) -> dict:
        """What this hook adds to `train()`'s returned summary."""
        return {}
