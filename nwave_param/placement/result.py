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
    """

    name: str
    neurons: int
    recurrent: bool
    front_end: bool
    cores: dict[int, int] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return ("recurrent" if self.recurrent else "feed-forward") + (", front end" if self.front_end else "")

    def to_dict(self) -> dict:
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
    line each), and what the check noticed without calling it a problem (``notes``)."""

    spec: ChipSpec
    populations: list[Population]
    problems: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """JSON-ready (core indices as strings)."""
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
            [one_line(p.name), str(p.neurons), p.kind, ", ".join(f"core {c}: {n} from {p.offsets.get(c, 0)}" for c, n in p.cores.items()) or "-"]
            for p in self.populations
        ]
        lines = [header, *aligned([["population", "neurons", "kind", "cores"], *rows], "lrll")] if rows else [header]
        return "\n".join(lines + [f"problem: {problem}" for problem in self.problems] + [f"note: {note}" for note in self.notes])
