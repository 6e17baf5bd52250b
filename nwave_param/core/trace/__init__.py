"""What a network computes, read from one traced forward: :func:`trace` (the tracer, and what it
follows: :mod:`.tracer`), what it finds (:mod:`.records`: synapse uses, neuron calls, the
:class:`Trace`), and the pieces it reads ops with: how an op maps dims (:mod:`.dims`), which ops
are synapses (:mod:`.synapses`), which input channels reach each element (:mod:`.channels`),
populations over time (:mod:`.populations`), and how each synapse reads its weight
(:mod:`.layouts`).

Imports the base and :mod:`nwave_param.core.passes` (a trace sees the latent weights) and
:mod:`nwave_param.core.state` (the model is restored bit for bit afterwards).
"""

from nwave_param.core.trace.layouts import layouts_read
from nwave_param.core.trace.records import INPUT, Call, Trace, Use
from nwave_param.core.trace.tracer import trace, unchanged

__all__ = ["INPUT", "Call", "Trace", "Use", "layouts_read", "trace", "unchanged"]
