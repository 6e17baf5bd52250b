"""Registering the chip constraint on a model, and the Registry that works with it.

Lifecycle, modelled on ``torch.ao.pruning``'s sparsifier::

    reg = register(model)                    # prepare: one ChipConstraint per tracked weight
    loss = task_loss + reg.penalty()         # train: the penalties steer toward the chip,
    reg.harden(h)                            #   and the network computes with what the chip holds
    reg.remove(leave_projected=True)         # squash: the plain model, holding what the chip holds
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param import functional
from nwave_param._engine import hardening, penalties
from nwave_param.core import state
from nwave_param.core.chains import originals, write_through_chain
from nwave_param.core.classes import attach, detach
from nwave_param.core.discovery import Constrained, constraints, patterns, select, tied_holders
from nwave_param.core.parametrization import ChipConstraint
from nwave_param.core.passes import Pass
from nwave_param.core.report import Report, build_report
from nwave_param.core.settings import Registration, RegistrationSettings, check_hardness, check_scale, open_pass, pin, unpin
from nwave_param.functional import PenaltyTerms
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["AlreadyRegisteredError", "Registry", "register", "registry_of"]


class AlreadyRegisteredError(ValueError, RuntimeError):
    """The model already carries nwave_param constraints."""


def register(
    model: nn.Module,
    spec: ChipSpec | None = None,
    *,
    alpha: float = 1.0,
    lam: float = 1.0,
    power: int = 2,
    exclude: str | Iterable[str] = (),
    example: Tensor | None = None,
    layouts: Mapping[str, Layout] | None = None,
    dims: str | None = None,
) -> Registry:
    r"""Track every weight of ``model`` against the chip's constraints.

    Registers a :class:`~nwave_param.ChipConstraint` (last in any existing chain) on each tracked
    weight, read as a connectivity matrix by its :class:`~nwave_param.Layout`.  The model computes
    exactly what it did before; add :meth:`Registry.penalty` (:math:`\alpha \cdot` magnitude
    :math:`+ \lambda \cdot` topology) to the loss, and :meth:`Registry.harden` it onto the chip.

    Without ``example`` or ``layouts``, a weight held by a module type nwave_param has no rule for
    (a bare Parameter of your own module) is read as torch's ``F.linear`` reads it, ``[out, in]``,
    with one warning naming it and both ways to state another reading.

    Args:
        model: the network.
        spec: the chip (default ``ChipSpec()``, the H1v1's).
        alpha: the magnitude penalty's strength, a finite number >= 0.
        lam: the topology penalty's strength, a finite number >= 0.
        power: the magnitude penalty's exponent, 1 or 2.
        exclude: globs of dotted weight names not to track.
        example: an input of ``model``: one forward, traced (:mod:`nwave_param.core.trace`), tells which
            weights the network uses as synapses, whatever their names, and how it reads each
            (``x @ W`` reads ``W`` as ``[in, out]``, the chip vendor's convention); those it never
            uses as one are named in a warning.  Without it, the weights
            :func:`~nwave_param.trackable_weights` names, read by their module's type.
        layouts: a dotted name (or glob) to the :class:`~nwave_param.Layout` of that weight, by
            hand: ``{"fc.W": nwp.Layout(inputs_first=True)}``; it also tracks a weight of any name.
        dims: how ``example``'s dims are read (:func:`~nwave_param.core.trace.example_dims`).

    Returns:
        The :class:`Registry` of the model.

    Raises:
        ValueError: no trackable weight, ``exclude`` leaves none, a bad ``alpha``/``lam``/``power``,
            a weight on the meta device or not initialized yet (a lazy module), several devices, a
            shape its layout cannot read, Parameters over overlapping memory, a tied Parameter its
            holders read with different layouts, a weight the forward reads two ways, ``dims``
            that does not read ``example``, a ``layouts`` entry that matches nothing or
            contradicts the forward, two ``layouts`` globs giving one weight two readings.
        TypeError: ``model`` not an nn.Module, or already compiled (register before
            ``torch.compile``); a tracked weight that is not floating point; ``spec`` not a
            ChipSpec; ``exclude`` not a glob or several; ``layouts`` not a mapping of names to
            Layouts; ``example`` not a tensor.
        AlreadyRegisteredError: the model already carries nwave_param constraints
            (use :func:`registry_of`, or :meth:`Registry.remove` first).

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> reg = register(model, exclude="2.*")
        >>> reg.names
        ['0.weight']
        >>> loss = model(torch.randn(4, 8)).sum() + reg.penalty()
    """
    registration = Registration(RegistrationSettings(ChipSpec() if spec is None else spec, alpha, lam, power))
    if isinstance(model, nn.Module):
        present = [c.name for c in constraints(model)]
        if present:
            raise AlreadyRegisteredError(
                f"the model already carries nwave_param constraints on {', '.join(present)}: "
                "use nwp.registry_of(model), or call .remove() on it before registering again"
            )
    selected = select(model, patterns(exclude), example, layouts, dims)
    holders = tied_holders(model, selected)
    orders = {id(module): tuple(module._parameters) for module, _, _ in holders}
    attached: list[Constrained] = []
    try:
        for module, tensor_name, layout in holders:
            constraint = ChipConstraint(layout, registration, orders[id(module)])
            attach(module, tensor_name, constraint)
            state.add_load_hook(module)
            attached.append(Constrained(tensor_name, module, tensor_name, constraint))
        state.add_load_hook(model)  # checks a checkpoint's every description before the first tensor is copied
        pin(model, registration)  # a forward computes with the settings it started with
    except BaseException:
        _remove(attached, model)
        raise
    return Registry._of(model)


def registry_of(model: nn.Module) -> Registry:
    """The :class:`Registry` of ``model``, rebuilt from its constraints alone.

    Works on a ``copy.deepcopy`` of a registered model, in each DDP process
    (``registry_of(ddp.module)``), after ``load_state_dict``, and on a module holding several
    registered submodules whose settings agree.  Names are relative to ``model``.

    Args:
        model: a registered model, or a module holding registered parts.

    Returns:
        A :class:`Registry` over every nwave_param constraint under ``model``.

    Raises:
        LookupError: ``model`` carries no nwave_param constraint.
        ValueError: its constraints were registered with different settings.
    """
    return Registry._of(model)


def strip(model: nn.Module) -> None:
    """Remove every nwave_param constraint from ``model``, whichever registration it came from."""
    _remove(constraints(model), model)


def _remove(entries: Iterable[Constrained], model: nn.Module) -> None:
    entries = list(entries)
    for entry in entries:
        detach(entry.module, entry.tensor_name, entry.constraint)
    for module, order in {id(e.module): (e.module, e.constraint.parameter_order) for e in entries}.values():
        state.restore_order(module, order)
    for module in model.modules():  # the hooks of modules left with no constraint beneath them
        if next(constraints(module), None) is None:
            state.remove_load_hook(module)
            unpin(module)


_READ_ONLY = {
    "spec": "register again with the new spec (reg.remove(); nwp.register(model, spec))",
    "alpha": "pass reg.penalty(alpha=...) for a schedule, or register again",
    "lam": "pass reg.penalty(lam=...) for a schedule, or register again",
    "power": "register again with the new power",
    "hardness": "call reg.harden(h)",
    "names": "it is read from the model",
    "layouts": "it is read from the model",
}


class Registry:
    """The tracked weights of one model: penalties, hardening, reports, projection and removal.

    A view over the model's :class:`~nwave_param.ChipConstraint` objects, which share one
    :class:`~nwave_param.core.settings.Registration` and its frozen settings: build one with
    :func:`register` or :func:`registry_of`, and as many as you like, they all read and change
    the same settings.  ``spec``, ``alpha``, ``lam``, ``power`` and ``hardness`` are read-only.
    """

    def __init__(self, model: nn.Module) -> None:
        """Deprecated: :func:`registry_of` is the one way to get a model's registry (this goes in 0.5)."""
        warnings.warn(
            "Registry(model) is deprecated: use nwp.registry_of(model) (Registry(model) goes in 0.5)", DeprecationWarning, stacklevel=2
        )
        self._view(model)

    @classmethod
    def _of(cls, model: nn.Module) -> Registry:
        """What :func:`register` and :func:`registry_of` return (the public way): a view over
        ``model``'s constraints; LookupError or ValueError as :func:`registry_of` says."""
        reg = cls.__new__(cls)
        reg._view(model)
        return reg

    def _view(self, model: nn.Module) -> None:
        entries = list(constraints(model)) if isinstance(model, nn.Module) else []
        if not entries:
            raise LookupError(f"{type(model).__name__} carries no nwave_param constraint: call nwp.register(model)")
        first = entries[0]
        for entry in entries[1:]:
            if entry.constraint.settings != first.constraint.settings:
                raise ValueError(
                    f"{first.name} and {entry.name} were registered with different settings "
                    f"({first.constraint.settings} and {entry.constraint.settings}): one registry needs one "
                    "configuration; remove one registration and register again"
                )
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_entries", tuple(entries))  # every constraint: harden, remove
        registrations = {id(e.constraint.registration): e.constraint.registration for e in entries}
        object.__setattr__(self, "_registrations", tuple(registrations.values()))  # several for separately registered parts
        # what a pass serves, and whether it hardens the weight with the others (nwave_param's constraint is its only link)
        holders = [(e.module, e.tensor_name, e.constraint, len(e.chain()) == 1) for e in entries]
        object.__setattr__(self, "_holders", tuple([h for h in holders if h[2].registration is r] for r in self._registrations))
        latents: set[int] = set()
        tracked = []  # each latent weight once: a tied Parameter is held by several constraints
        for entry in entries:
            key = id(originals(entry.module, entry.tensor_name)[0]) if not entry.links_before() else id(entry.constraint)
            if key not in latents:
                latents.add(key)
                tracked.append(entry)
        object.__setattr__(self, "_tracked", tuple(tracked))
        # each tracked weight's chain, and whether nwave_param's constraint is all of it (its latent weight is then the Parameter)
        object.__setattr__(self, "_chains", tuple((e, e.chain(), len(e.chain()) == 1) for e in tracked))
        object.__setattr__(self, "_removed", False)

    def __setattr__(self, name: str, value: object) -> None:
        how = _READ_ONLY.get(name)
        raise AttributeError(f"Registry.{name} is read-only: {how}" if how else f"Registry has no attribute {name!r} to set")

    # --- configuration ----------------------------------------------------------------------

    @property
    def settings(self) -> RegistrationSettings:
        """The frozen configuration all constraints share."""
        return self._registrations[0].settings

    @property
    def spec(self) -> ChipSpec:
        """The chip the tracked weights are held to (read-only)."""
        return self.settings.spec

    @property
    def alpha(self) -> float:
        """The registered strength of the magnitude penalty (read-only)."""
        return self.settings.alpha

    @property
    def lam(self) -> float:
        """The registered strength of the topology penalty (read-only)."""
        return self.settings.lam

    @property
    def power(self) -> int:
        """The magnitude penalty's exponent, 1 or 2 (read-only)."""
        return self.settings.power

    @property
    def hardness(self) -> float:
        """How far the network computes with what the chip holds: 0 (the latent weights) to 1."""
        return self.settings.hardness

    @property
    def names(self) -> list[str]:
        """Dotted names of the tracked weights, relative to the model this registry was built from
        (a tied weight once, by its first name)."""
        return [entry.name for entry in self._tracked]

    @property
    def layouts(self) -> list[Layout]:
        """How each tracked weight reads as a connectivity matrix, in :attr:`names` order."""
        return [entry.constraint.layout for entry in self._tracked]

    def harden(self, hardness: float) -> Registry:
        r"""Compute with :math:`w + h\,(\mathrm{chip}(w) - w)` from now on; returns ``self``.

        ``hardness`` :math:`h \in [0, 1]`: 0 is the latent weights themselves, 1 what the chip
        holds, bit for bit.  The gradient passes straight through to the latent weights, which
        the penalties, :meth:`report`, :meth:`is_mappable` and :meth:`project_` keep judging.
        Saved in each weight's description: a checkpoint loaded into a model registered alike
        computes as the saved model did.  One assignment per registration, so a reader in
        another thread sees every weight at the old hardness or every one at the new.

        Args:
            hardness: :math:`h`, a real number in [0, 1].

        Returns:
            ``self``, so that ``reg = nwp.register(model).harden(1.0)`` is one line.

        Raises:
            TypeError: ``hardness`` is not a real number (nothing changes).
            ValueError: ``hardness`` is not in [0, 1] (nothing changes).
            RuntimeError: the registry was removed; or ``hardness`` is a new one and a constraint
                was removed by hand (nothing changes).
        """
        hardness = check_hardness(hardness)
        if all(r.settings.hardness == hardness for r in self._registrations) and not self._removed:
            return self  # a schedule sets the same hardness most steps: nothing to swap
        settings = dataclasses.replace(self.settings, hardness=hardness)
        self._check_live()
        for registration in self._registrations:
            registration.replace_settings(settings)
        return self

    # --- training ---------------------------------------------------------------------------

    def latent_weights(self) -> list[Tensor]:
        """The latent weights, differentiable: the Parameters themselves where nwave_param's
        constraint is the only parametrization, else what the earlier ones make of them (not
        ``module.weight``, which is the hardened value).

        Returns:
            One tensor per tracked weight, in :attr:`names` order.

        Raises:
            RuntimeError: the registry was removed.
        """
        self._check_removed()
        return [chain._parameters["original"] if alone else entry.latent() for entry, chain, alone in self._chains]

    def penalty_terms(self) -> PenaltyTerms:
        """``PenaltyTerms(magnitude, topology)``: unscaled, each divided by the number of tracked elements.

        Returns:
            A :class:`~nwave_param.PenaltyTerms` of two 0-dim differentiable tensors.

        Raises:
            RuntimeError: the registry was removed.
        """
        weights = self.latent_weights()
        magnitude, topology = penalties.penalty_sums(weights, self.layouts, self.spec, self.power)
        count = max(sum(w.numel() for w in weights), 1)
        return PenaltyTerms(magnitude / count, topology / count)

    def penalty(self, alpha: float | None = None, lam: float | None = None) -> Tensor:
        r""":math:`\alpha \cdot` magnitude :math:`+ \lambda \cdot` topology: a 0-dim differentiable
        tensor to add to the loss.  ``alpha``/``lam`` override the registered values for this call
        (a schedule needs no re-registration).

        Args:
            alpha: the magnitude penalty's strength for this call (None: the registered one).
            lam: the topology penalty's strength for this call (None: the registered one).

        Returns:
            A 0-dim tensor, differentiable with respect to the latent weights.

        Raises:
            ValueError: ``alpha`` or ``lam`` is not a finite number >= 0.
            RuntimeError: the registry was removed.
        """
        settings = self.settings
        alpha = settings.alpha if alpha is None else check_scale("alpha", alpha)
        lam = settings.lam if lam is None else check_scale("lam", lam)
        weights = self.latent_weights()
        count = max(sum(w.numel() for w in weights), 1)
        current = open_pass(self._registrations[0]) if len(self._registrations) == 1 else None
        shared = current.shared if current is not None else None  # inside cached(): the hardening's packs, reused
        return penalties.penalty_sums(
            weights, self.layouts, settings.spec, settings.power, scales=(alpha / count, lam / count), shared=shared
        )

    @contextlib.contextmanager
    def on_chip(self, seed: int | None = None) -> Iterator[None]:
        """Context manager: every tracked weight computes as one chip instance holds it.

        Inside, whatever the hardness and the mode, ``module.weight`` is
        :func:`~nwave_param.functional.project` of the latent weight exactly, plus, when
        ``spec.mismatch`` is set, one mismatch sample (Gaussian, standard deviation
        ``spec.mismatch``) drawn from a generator seeded with ``seed`` and kept for the whole
        context: one seed, one chip; another seed, another chip (``None``: a random one).  On
        exit everything is as before, bit for bit.  Averaging a metric over seeds estimates what
        a fleet of chips would give::

            accuracies = []
            for seed in range(10):
                with reg.on_chip(seed), reg.cached():
                    accuracies.append(evaluate(model))

        Enter it outside :meth:`cached` (values cached before it started would be kept).  It
        holds for the model, in every thread; a tied weight's holders get a sample each (on the
        chip they are separate synapses).  One at a time: the model holds one chip, so entering
        a second while one is open (in any thread, or nested) raises RuntimeError and changes
        nothing.

        Args:
            seed: seeds the mismatch sample: one seed, one chip (None: a random one).

        Returns:
            A context manager: the model is on the chip while it is entered.

        Raises:
            TypeError: ``seed`` is neither an int nor None.
            RuntimeError: an ``on_chip`` context is already open on the model, the registry was
                removed, or a constraint was removed by hand (on entering; nothing changes).
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self._check_live()
        spec = self.spec
        generator = torch.Generator()  # on the CPU: one seed is one chip on any device
        generator.manual_seed(seed) if seed is not None else generator.seed()
        instances = []
        with torch.no_grad():
            for entry in self._entries:  # a tied weight's holders are separate synapses on the chip
                latent = entry.latent()
                noise = None
                if spec.mismatch:
                    noise = torch.randn(latent.shape, generator=generator).mul_(spec.mismatch).to(latent)
                instances.append((entry.constraint, noise))
        with contextlib.ExitStack() as held:
            for registration in self._registrations:
                with registration.lock:
                    if registration.on_chip:
                        raise RuntimeError(
                            "the model is already on a chip (an on_chip context is open, in this thread or another): "
                            "the model holds one chip at a time; close that context first"
                        )
                    registration.on_chip = True
                held.callback(setattr, registration, "on_chip", False)
            for constraint, noise in instances:
                constraint.on_chip, constraint.chip_mismatch = True, noise
            try:
                yield
            finally:
                for constraint, _ in instances:
                    constraint.on_chip, constraint.chip_mismatch = False, None

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Context manager: one pass, in this thread.  Every weight is computed once, however often
        a time loop reads it, and all of them together, in a few kernels, at the first read, with
        the hardness in effect then.

        Wrap the forward of a recurrent net, and the penalty: ``with reg.cached(): loss =
        task(model(x)) + reg.penalty()``.  It works as ``torch.nn.utils.parametrize.cached()``
        does for the tracked weights, with the hardened weights computed at once
        (:func:`nwave_param._engine.hardening.harden_all`): the values are those each weight's forward
        computes alone, bit for bit.  Unlike parametrize's, the pass is this thread's own: a
        forward in another thread computes its own values, with its own gradients.  A
        ``reg.harden(h)`` inside it takes effect at the next read (the values are computed
        again), except in the middle of a forward of the registered model, which keeps the
        hardness it started with.  Other parametrizations of the model are not cached: wrap
        ``parametrize.cached()`` around it for those (it is shared by every thread).

        Returns:
            A context manager: the pass is open while it is entered (inside another ``cached()``
            of the same registration, the outer pass serves).
        """
        opened = []
        try:
            for registration, holders in zip(self._registrations, self._holders):
                if open_pass(registration) is None:  # an outer cached() keeps its pass
                    opened.append(Pass(registration, holders))
            yield
        finally:
            for current in opened:
                current.close()

    # --- deployment -------------------------------------------------------------------------

    def report(self) -> Report:
        """A :class:`~nwave_param.Report` of the latent weights: one row per weight; the rows sum
        to :meth:`penalty_terms`.

        Returns:
            The :class:`~nwave_param.Report`, its rows in :attr:`names` order.

        Raises:
            RuntimeError: the registry was removed.
        """
        return build_report(self.names, [w.detach() for w in self.latent_weights()], self.layouts, self.spec, self.power)

    def is_mappable(self) -> bool:
        """True exactly when every latent weight is finite, within ``[-limit, limit]`` (the limit
        itself allowed), has no mixed block column and (with ``spec.bits``) lies on the grid.

        Returns:
            Whether the latent weights can be written to the chip as they are.

        Raises:
            RuntimeError: the registry was removed.
        """
        return self.report().is_mappable

    @torch.no_grad()
    def project_(self) -> Registry:
        """Move the latent weights, in place, to what the chip holds; returns ``self``.

        Each weight becomes :func:`nwave_param.functional.project` of itself: clamped into
        ``[-limit, limit]``, the cheaper sign of each block column kept (a tie keeps the positive
        side) and, with ``spec.bits``, on the grid.  Idempotent; a mappable weight is left
        bit-identical; Parameters are updated in place, so optimizers keep working.  A weight
        under other parametrizations is written back through their ``right_inverse`` and read
        again.  All or nothing: on any error every tensor of every chain (the stored weights and
        the other parametrizations' buffers, such as orthogonal's ``base``) is restored bit for bit.

        Returns:
            ``self``.

        Raises:
            ValueError: a weight holds NaN or infinite values, its chain has a parametrization
                without ``right_inverse``, or the chain cannot hold the projected value (named).
            RuntimeError: the registry was removed, or a constraint was removed by hand (nothing
                is changed).
        """
        self._check_live()
        weights = self.latent_weights()
        problems = functional.unprojectable(self.names, weights) + [
            f"{entry.name} sits behind {type(link).__name__}, which has no right_inverse to write the projected value back"
            for entry in self._tracked
            for link in entry.links_before()
            if not hasattr(link, "right_inverse")
        ]
        if problems:
            raise ValueError(f"cannot project: {'; '.join(problems)}; nothing was changed")
        spec = self.spec
        targets = hardening.harden_all(weights, [entry.constraint.layout for entry in self._tracked], spec, 1.0)  # chip(w) of each
        backup = state.snapshot(entry.module.parametrizations[entry.tensor_name] for entry in self._tracked)
        try:
            for entry, weight, target in zip(self._tracked, weights, targets):
                if entry.links_before():
                    write_through_chain(entry.module, entry.tensor_name, entry.constraint, entry.name, target, spec)
                else:
                    weight.copy_(target)
        except BaseException:
            state.restore(backup)
            raise
        return self

    def remove(self, leave_projected: bool = False) -> None:
        """Remove every constraint: module classes, Parameters, state_dict keys and their order as
        before registration.

        The weights stay the latent ones as stored, or with ``leave_projected`` what the chip holds:
        :meth:`project_` first, in the same call, all or nothing (a refused projection removes
        nothing), as ``torch.nn.utils.parametrize.remove_parametrizations(..., leave_parametrized=True)``
        keeps the parametrized value.  The squash step of the lifecycle is then one line.

        Args:
            leave_projected: project the latent weights onto the chip (:meth:`project_`) before
                removing.

        Raises:
            RuntimeError: already removed, or a constraint was removed by hand (nothing is changed;
                ``registry_of(model).remove()`` removes the remaining ones).
            ValueError: with ``leave_projected``, what :meth:`project_` refuses (nothing is changed).
        """
        self._check_live()
        if leave_projected:
            self.project_()
        _remove(self._entries, self._model)
        object.__setattr__(self, "_removed", True)

    def _check_removed(self) -> None:
        if self._removed:
            raise RuntimeError("this registry was removed; register the model again to track it")

    def _check_live(self) -> None:
        self._check_removed()
        gone = [
            e.name
            for e in self._entries
            if not parametrize.is_parametrized(e.module, e.tensor_name)
            or not any(link is e.constraint for link in e.module.parametrizations[e.tensor_name])
        ]
        if gone:
            raise RuntimeError(
                f"the constraint on {', '.join(gone)} was removed outside this registry; "
                "use nwp.registry_of(model) for the ones that remain"
            )

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"Registry({len(self._tracked)} weights, {s.spec}, alpha={s.alpha}, lam={s.lam}, "
            f"power={s.power}, hardness={s.hardness})"
        )
