r"""The recipe, as one object: the hardness, the penalty's scale and the learning rate over training.

::

    schedule = nwp.Schedule(reg, total_steps, optimizer)   # the defaults are the rule
    for x, y in batches:
        if schedule.steps == schedule.regroup_step:        # once, before the constraints start
            nwp.regroup_(model, x, optimizer)
        with reg.cached():
            loss = task(model(x), y) + schedule.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()                                    # after each optimizer step

At training step :math:`t` of :math:`T` (the fraction :math:`f = t / T`):

* for the first 10% the network trains without constraints; then :func:`~nwave_param.regroup_`
  reorders each hidden population's neurons so that the chip's sign-sharing blocks group neurons
  whose learnt input signs agree (at ``regroup_step``);
* the hardness rises linearly from 0 to 1 over ``harden`` (:math:`f` from 0.1 to 0.4), then holds
  at 1: the network computes with what the chip holds for the last 60% of training;
* the penalty's scale rises linearly from 0 at ``harden``'s start to ``penalty`` (20) at
  ``penalty_rise`` (half of training), then holds;
* the learning rate holds, then falls linearly to 0 from ``settle`` (60%) on, so that the
  latent weights settle instead of jumping across the chip's sign and grid boundaries at the end.

Measured over seeds 0-4 on the demo (docs/training-on-the-chip.md, test set): the hardened network
on the chip ends, on average, 0.6 points under the same network trained without constraints on
H1v2 digits, 0.8 on H1v1 digits, 0.4 on H1v2 spoken vowels and 1.2 with a 5-bit grid and mismatch.
"""

from __future__ import annotations

import math
import numbers

import torch

from nwave_param.core.registry import Registry

__all__ = ["Schedule", "settling"]


def settling(step: int, total_steps: int, settle: float = 0.6) -> float:
    """The rule's learning-rate factor at ``step`` of ``total_steps``: 1, then linearly to 0 from
    the fraction ``settle`` on.  ``LambdaLR(optimizer, lambda step: settling(step, total))`` gives
    a network trained without constraints the same decay, for a comparison that measures the chip
    alone.

    Args:
        step: the optimizer steps taken.
        total_steps: the optimizer steps of the whole training.
        settle: the fraction of training after which the factor falls.

    Returns:
        The factor, in [0, 1].
    """
    done = step / total_steps
    if done <= settle:
        return 1.0
    return 0.0 if done >= 1.0 else (1.0 - done) / (1.0 - settle)  # past the end: 0 (settle=1.0 divides by 0)


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"Schedule: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


class Schedule:
    """The recipe's hardness, penalty scale and learning-rate decay at each step of training.

    Args:
        reg: the :class:`~nwave_param.Registry` it drives (``reg.harden`` at each step).
        total_steps: the optimizer steps of the whole training.
        optimizer: given, its learning rates follow the decay (a
            :class:`~torch.optim.lr_scheduler.LambdaLR` over their values now), set from those
            values at each step, so the schedule is their only scheduler: a rate another
            scheduler or a hand changed is refused at the next :meth:`step`.  Without one, pair
            the schedule with the same decay: ``LambdaLR(optimizer, schedule.learning_rate)``,
            its factor multiplied by a warmup's, say, to combine the two.
        harden: ``(start, end)``: the fractions of training over which the hardness rises to 1;
            None keeps it at 0 (the penalties alone).  Nothing constrains before ``start``.
        penalty: the penalty's scale once risen.
        penalty_rise: the fraction of training by which the penalty's scale has risen (from
            ``harden``'s start, or from the first step with ``harden=None``).
        settle: the fraction after which the learning rate falls linearly to 0.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import nwave_param as nwp
        >>> model = nn.Linear(4, 5)
        >>> reg = nwp.register(model)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> schedule = nwp.Schedule(reg, total_steps=10, optimizer=optimizer)
        >>> for step in range(10):
        ...     loss = model(torch.randn(2, 4)).square().mean() + schedule.penalty()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     schedule.step()
        >>> reg.hardness, optimizer.param_groups[0]["lr"]
        (1.0, 0.0)

    Raises:
        TypeError: ``reg`` is not a Registry, ``optimizer`` not a torch optimizer.
        ValueError: ``total_steps`` not a positive int; ``harden`` not a pair or None; a fraction
            outside [0, 1], ``harden``'s start after its end or after ``penalty_rise``; ``penalty``
            negative or not finite.
        RuntimeError: ``reg`` was removed (``reg.harden`` refuses).

    Attributes:
        regroup_step: the step (``steps``) at which to call :func:`~nwave_param.regroup_`: the
            last with neither hardness nor penalty, ``floor(harden[0] * total_steps)`` (a step
            later where floating point rounds the product down; ``total_steps``, past the last
            step, with ``harden[0] = 1``); None with ``harden=None``.
    """

    def __init__(
        self,
        reg: Registry,
        total_steps: int,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        harden: tuple[float, float] | None = (0.1, 0.4),
        penalty: float = 20.0,
        penalty_rise: float = 0.5,
        settle: float = 0.6,
    ) -> None:
        if not isinstance(reg, Registry):
            raise TypeError(f"Schedule: reg must be a Registry (nwp.register(model)), got {type(reg).__name__}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(
                f"Schedule: total_steps must be a positive int (the optimizer steps of the whole training), got {total_steps!r}"
            )
        if harden is not None and (not isinstance(harden, (tuple, list)) or len(harden) != 2):
            raise ValueError(f"Schedule: harden must be (start, end), fractions of training, or None, got {harden!r}")
        start, end = (_fraction("harden", f) for f in harden) if harden is not None else (None, None)
        if harden is not None and start > end:
            raise ValueError(f"Schedule: harden must rise, start <= end, got {harden!r}")
        if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not (math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"Schedule: penalty must be a finite number >= 0, got {penalty!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Schedule: optimizer must be a torch optimizer or None, got {type(optimizer).__name__}")
        self.reg, self.total_steps = reg, int(total_steps)
        rise = _fraction("penalty_rise", penalty_rise)
        if harden is not None and rise < start:
            raise ValueError(
                f"Schedule: penalty_rise ({rise:g}) must not come before harden's start ({start:g}): the penalty rises from there"
            )
        self.harden_over, self.scale, self.penalty_rise = (start, end), float(penalty), rise
        self.settle = _fraction("settle", settle)
        self.steps = 0
        self.regroup_step = None if start is None else self._last_unconstrained(start)
        self.learning_rates = None if optimizer is None else torch.optim.lr_scheduler.LambdaLR(optimizer, self.learning_rate)
        reg.harden(self.hardness_at(0))

    def _last_unconstrained(self, start: float) -> int:
        """The last step at which neither the hardness nor the penalty has started (``floor(start *
        total_steps)``, one later where floating point rounds the product down)."""
        step = math.floor(start * self.total_steps)
        while step < self.total_steps and self.hardness_at(step + 1) == 0 and self.scale_at(step + 1) == 0:
            step += 1
        return step

    # --- the rule, as functions of the step ---------------------------------------------------------

    def hardness_at(self, step: int) -> float:
        """The hardness at ``step``: 0, then linearly to 1 over ``harden``, then 1 (always 0
        with ``harden=None``: the penalties alone).

        Args:
            step: the optimizer steps taken.

        Returns:
            The hardness, in [0, 1].
        """
        start, end = self.harden_over
        if start is None:
            return 0.0
        done = step / self.total_steps
        if done <= start:  # up to the start, nothing constrains (the regroup step included)
            return 0.0
        return 1.0 if done >= end else (done - start) / (end - start)

    def scale_at(self, step: int) -> float:
        """The penalty's scale at ``step``: 0 until ``harden``'s start (from the first step with
        ``harden=None``), then linearly to ``penalty`` at ``penalty_rise``.

        Args:
            step: the optimizer steps taken.

        Returns:
            The scale, from 0 to ``penalty``.
        """
        start = self.harden_over[0]
        done = step / self.total_steps
        if start is not None and done <= start:  # up to harden's start, nothing constrains
            return 0.0
        if done >= self.penalty_rise:
            return self.scale
        start = start or 0.0  # without hardening, the penalty rises from the first step
        return self.scale * (done - start) / (self.penalty_rise - start)

    def learning_rate(self, step: int) -> float:
        """The factor on the learning rate at ``step``: 1, then linearly to 0 from ``settle`` on
        (:func:`settling`).

        Args:
            step: the optimizer steps taken.

        Returns:
            The factor, in [0, 1].
        """
        return settling(step, self.total_steps, self.settle)

    # --- training -----------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """``reg.penalty()`` at this step's scale, in the same autograd node.

        Returns:
            A 0-dim differentiable tensor to add to the loss.

        Raises:
            RuntimeError: the registry was removed.
        """
        scale = self.scale_at(self.steps)
        return self.reg.penalty(alpha=scale * self.reg.alpha, lam=scale * self.reg.lam)

    def step(self) -> None:
        """Advance one optimizer step: the hardness (and, given the optimizer, its learning rates)
        of the next step.

        Raises:
            RuntimeError: the registry was removed, or one of its constraints by hand
                (``reg.harden`` refuses); given the optimizer, one of its learning rates is not
                the one the schedule set (another scheduler or a hand changed it).  Nothing
                changes.  A param group added since takes the rule's factor from the next step
                on, on its ``initial_lr`` (its rate when added, if it has none), as the others do.
        """
        if self.learning_rates is not None:
            self._check_learning_rates()
            self.learning_rates.step()  # its own step count, not ours
        self.steps += 1
        self.reg.harden(self.hardness_at(min(self.steps, self.total_steps)))

    def _check_learning_rates(self) -> None:
        """Refuse rates the schedule did not set: its LambdaLR sets each from its initial value,
        so another scheduler's change would be lost, or, stepped after it, scaled wrongly.  Then
        adopt the param groups added since (unfrozen layers): the rule's factor on their
        ``initial_lr``, as the others."""
        groups, rates = self.learning_rates.optimizer.param_groups, self.learning_rates._last_lr  # what get_last_lr() returns
        for k, (group, rate) in enumerate(zip(groups, rates)):
            if not isinstance(group["lr"], torch.Tensor) and group["lr"] != rate:  # a tensor rate is not read: no host sync
                raise RuntimeError(
                    f"Schedule: param group {k}'s learning rate is {group['lr']!r}, not the {rate!r} the schedule set (another "
                    "scheduler, a hand or an optimizer state of another run changed it); the schedule given the optimizer is its "
                    "only scheduler: give it none and drive the rate with one LambdaLR, "
                    "e.g. lambda t: warmup(t) * schedule.learning_rate(t)"
                )
        for group in groups[len(rates):]:
            rate = group["lr"]
            group.setdefault("initial_lr", rate.clone() if isinstance(rate, torch.Tensor) else rate)  # LambdaLR fills the rate in place
            self.learning_rates.base_lrs.append(group["initial_lr"])
            self.learning_rates.lr_lambdas.append(self.learning_rate)
            rates.append(rate)

    @property
    def hardness(self) -> float:
        """The hardness the registry computes with now."""
        return self.reg.hardness

    def state_dict(self) -> dict[str, int]:
        """What resuming needs: the step count (the hardness, the penalty's scale and, given the
        optimizer, its learning rates all follow from it).

        Returns:
            ``{"steps": <the optimizer steps taken>}``.
        """
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the step count of ``state``, and that step's hardness and, given the optimizer,
        its learning rates (each group's initial rate times :meth:`learning_rate`), whether the
        optimizer's own state was loaded before or after.

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            KeyError: ``state`` holds no ``"steps"``.
            ValueError: its ``"steps"`` is not a whole number >= 0 (an int, or a float or 0-dim
                tensor holding one; nothing changes).
            RuntimeError: the registry was removed, or one of its constraints by hand
                (``reg.harden`` refuses).
        """
        given = state["steps"]
        steps = given.item() if isinstance(given, torch.Tensor) and given.dim() == 0 else given  # through a tensor-only format
        if not isinstance(steps, (bool, numbers.Integral)) and isinstance(steps, numbers.Real) and float(steps).is_integer():
            steps = int(steps)  # a whole number that went through a float (YAML or JSON readers)
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"Schedule.load_state_dict: steps must be a whole number >= 0 (the optimizer steps taken), got {given!r}")
        steps = int(steps)  # a numpy or tensor int, as Python's
        self.reg.harden(self.hardness_at(min(steps, self.total_steps)))
        self.steps = steps
        if self.learning_rates is not None:
            # LambdaLR counts its own steps from construction; set it where the schedule is, as its step() would
            rates = [base * self.learning_rate(self.steps) for base in self.learning_rates.base_lrs]
            self.learning_rates.last_epoch = self.steps
            self.learning_rates._last_lr = rates  # what get_last_lr() returns
            for group, rate in zip(self.learning_rates.optimizer.param_groups, rates):
                if isinstance(group["lr"], torch.Tensor):  # a tensor rate stays the same tensor, as LambdaLR.step keeps it
                    group["lr"].fill_(rate)
                else:
                    group["lr"] = rate

    def callback(self):
        """A Lightning callback that calls :meth:`step` after each optimizer step (Lightning's
        ``Callback``; needs Lightning installed): at the end of each training batch, until the
        schedule's step count reaches the trainer's ``global_step``, its count of optimizer steps.
        So with ``accumulate_grad_batches`` the schedule steps once per accumulated group of
        batches, as a ``LambdaLR`` stepped at ``interval: "step"`` does; with several optimizers
        stepped by hand, once per optimizer step (Lightning counts each); and ``total_steps`` is
        what ``max_steps`` counts.  Its ``training_step`` adds :meth:`penalty` to the loss.

        Returns:
            A ``lightning.pytorch.Callback`` driving this schedule; its state is the schedule's.

        Raises:
            ImportError: Lightning is not installed.
        """
        from lightning.pytorch import Callback

        schedule = self

        class ScheduleCallback(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                while schedule.steps < trainer.global_step:  # none on a batch that only accumulated gradients
                    schedule.step()

            def state_dict(self):
                return schedule.state_dict()

            def load_state_dict(self, state_dict):
                schedule.load_state_dict(state_dict)

        return ScheduleCallback()

    def __repr__(self) -> str:
        return (
            f"Schedule(step {self.steps} of {self.total_steps}, hardness {self.hardness_at(self.steps):g}, "
            f"penalty scale {self.scale_at(self.steps):g}, learning rate x{self.learning_rate(self.steps):g})"
        )
