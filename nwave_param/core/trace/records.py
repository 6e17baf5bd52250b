"""What a trace finds: the synapse uses (:class:`Use`), the neuron calls (:class:`Call`), and the :class:`Trace` of a network."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["Call", "INPUT", "Info", "MADE", "Trace", "UNKNOWN", "Use"]


INPUT = ("input",)  # the example's values, as an activation source


UNKNOWN = "unknown"  # channels that reach a tensor in a way the trace cannot follow


MADE = "a tensor made in the forward"


class Info:
    """What the trace knows of one tensor."""

    __slots__ = ("acts", "weights", "labels", "channels")

    def __init__(self, acts: frozenset = frozenset(), weights: tuple = (), labels: tuple = (), channels: object = None) -> None:
        self.acts = acts  # activation sources: INPUT, ("spikes", p), ("state", p), ("own", p), ("current", use)
        self.weights = weights  # ((weight name, dims), ...): the Parameters it is made of, dims as theirs
        self.labels = labels  # per dim: "batch", "time" or None
        self.channels = channels  # None, UNKNOWN, or (dim or None, (input channels per index along dim, ...))


@dataclass(frozen=True)
class Use:
    """One synapse: an op consuming weight ``name`` (a Parameter's name; for a fixed synapse, a
    buffer's or "a tensor made in the forward", with ``parameter`` False).

    ``outputs`` and ``inputs`` are the weight's dims indexing the output neurons and the inputs
    (None where the op's reading does not map to one dim of the Parameter); ``rows`` is how many
    output neurons the op reads of it (fewer than the Parameter holds when the forward splits
    it).  ``reads`` are the sources of the activations it consumes; ``where`` names the op and the
    module it ran in; ``index`` is its place in :attr:`Trace.all_uses`, which its current names;
    ``unrolled`` is a convolution's ``(reach, positions)``: how many output positions its kernel
    carries one input position to (:func:`~nwave_param.core.trace.synapses.kernel_reach`), and
    the positions of its output map; ``(1, 1)`` for every other op."""

    index: int
    name: str
    op: str
    outputs: int | None
    inputs: int | None
    groups: int
    gates: int
    reads: frozenset
    where: str
    rows: int | None = None
    parameter: bool = True
    unrolled: tuple[int, int] = (1, 1)

    def describe(self) -> str:
        dims = f"output neurons along dim {self.outputs}" if self.outputs is not None else "output neurons along no single dim"
        return f"{self.where} ({dims})"


@dataclass
class Call:
    """One call of a neuron module, in the population it continues or starts."""

    population: int
    neurons: int | None
    batch_found: bool  # whether the spikes' batch dim was followed from the example (else dim 0 was taken)


@dataclass
class Trace:
    """What one forward computed: the synapses (each Parameter's, and all of them in order), the
    populations (their modules, calls and what reached their spikes), how the input channels reach
    each population the input reaches before any other, and what the trace noticed."""

    uses: dict[str, list[Use]] = field(default_factory=dict)  # a Parameter's name -> its synapses
    all_uses: list[Use] = field(default_factory=list)
    populations: list[str] = field(default_factory=list)  # the neuron module's dotted name, per population
    modules: list[nn.Module] = field(default_factory=list)  # the neuron module, per population
    calls: list[Call] = field(default_factory=list)
    feeds: dict[int, frozenset] = field(default_factory=dict)  # population -> what reached its spikes
    # front population -> (fan-in, fan-out) from the input; None: not known
    fans: dict[int, tuple[int, int] | None] = field(default_factory=dict)
    channels: int = 0  # the example's channels per time step
    notes: list[str] = field(default_factory=list)

    def neurons(self, population: int) -> int | None:
        """The population's neurons: its first call's."""
        return next(c.neurons for c in self.calls if c.population == population)
