"""What :func:`~nwave_param.place` returns: the populations it found, where each sits, and the
problems and notes."""

from __future__ import annotations

from dataclasses import dataclass, field

from nwave_param.core.report import aligned
from nwave_param.errors import one_line
from nwave_param.spec import ChipSpec

__all__ = ["Placement", "Population"]


@dataclass(frozen=True)
class Population:
    """One population of the network, and where it sits.

    ``cores`` maps a core's index to the neurons placed there, and ``offsets`` to where in that
    core the piece starts (a multiple of ``spec.group_size``); both empty when the network does
    not fit.  Pieces follow the population's order of neurons in the order of their cores.

    Attributes:
        name: its neuron module's dotted name (``[k]`` numbers the populations of one module).
        neurons: its size: every neuron of its spikes but the batch and time.
        recurrent: its spikes reach its own input through weights.
        front_end: the input reaches it first.
        cores: a core's index to the number of its neurons placed there.
        offsets: a core's index to the neuron of that core where its piece starts.
    """

    name: str
    neurons: int
    recurrent: bool
    front_end: bool
    cores: dict[int, int] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"recurrent"`` or ``"feed-forward"``, with ``", front end"`` for the front end."""
        return ("recurrent" if self.recurrent else "feed-forward") + (", front end" if self.front_end else "")

    def to_dict(self) -> dict:
        """The population as JSON-ready data.

        Returns:
            A dict of its fields, the keys of ``cores`` and ``offsets`` as strings.
        """
        return {
            "name": self.name,
            "neurons": self.neurons,
            "recurrent": self.recurrent,
            "front_end": self.front_end,
            "cores": {str(core): count for core, count in self.cores.items()},
            "offsets": {str(core): first for core, first in self.offsets.items()},
        }


@dataclass(frozen=True)
class Placement:
    """Where a network's populations sit on the chip, or the rules it breaks (``problems``, one
    line each), and what the check noticed without calling it a problem (``notes``).

    ``str(placement)`` is a table of the populations and where each sits, then a line a problem
    and a line a note.

    Attributes:
        spec: the chip the network was placed on.
        populations: the network's populations, and where each sits.
        problems: each rule the network breaks, one line each; empty when it fits.
        notes: what the check noticed without calling it a problem, one line each.
    """

    spec: ChipSpec
    populations: list[Population]
    problems: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether the network can be placed on the chip: no problem found."""
        return not self.problems

    def to_dict(self) -> dict:
        """The placement as JSON-ready data (core indices as strings).

        Returns:
            A dict of ``fits``, ``spec`` (:meth:`ChipSpec.to_dict <nwave_param.ChipSpec.to_dict>`),
            ``populations`` (each :meth:`Population.to_dict`), ``problems`` and ``notes``.
        """
        return {
            "fits": self.fits,
            "spec": self.spec.to_dict(),
            "populations": [p.to_dict() for p in self.populations],
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        cores = ", ".join(f"{n}" for n in self.spec.cores)
        header = f"cores ({cores}), {self.spec.inputs} inputs: " + ("fits" if self.fits else "does NOT fit")
        rows = [
            [
                one_line(p.name),
                str(p.neurons),
                p.kind,
                ", ".join(f"core {c}: {n} from {p.offsets.get(c, 0)}" for c, n in p.cores.items()) or "-",
            ]
            for p in self.populations
        ]
        lines = [header, *aligned([["population", "neurons", "kind", "cores"], *rows], "lrll")] if rows else [header]
        return "\n".join(lines + [f"problem: {problem}" for problem in self.problems] + [f"note: {note}" for note in self.notes])
