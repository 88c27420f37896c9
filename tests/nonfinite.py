"""NaN losses at chosen steps, injected from outside the training loop (which has no switch for
them): the loss of such a step is multiplied by NaN, so its gradients are NaN too, as in a run
that diverged there. Steps count from 1, as the logs count them."""

import dataclasses

from txtrain.train import Trainer


def nan_loss_at(trainer: Trainer, steps) -> Trainer:
    """``trainer``, whose loss is NaN at ``steps`` (those after the step it resumed from)."""
    forward_backward = trainer.strategy.forward_backward

    def forward_backward_maybe_nan(model, micro_batches, loss_fn, precision):
        if trainer.step + 1 in steps:
            loss_fn = times_nan(loss_fn)
        return forward_backward(model, micro_batches, loss_fn, precision)

    trainer.strategy.forward_backward = forward_backward_maybe_nan
    return trainer


def times_nan(loss):
    """The step's loss (a TokenLoss: the sum over targets / divide_by) divided by NaN."""
    return dataclasses.replace(loss, divide_by=float("nan"))


def nan_loss_in_every_trainer(monkeypatch, steps) -> None:
    """The same for every Trainer built in this test from now on, such as the command line's."""
    build = Trainer.__init__

    def build_with_nan_losses(trainer, *args, **kwargs):
        build(trainer, *args, **kwargs)
        nan_loss_at(trainer, steps)

    monkeypatch.setattr(Trainer, "__init__", build_with_nan_losses)
