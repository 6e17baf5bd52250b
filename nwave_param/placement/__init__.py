"""The network on the chip: ``nwp.place(model, example, spec)`` reads the network from one traced
forward (:mod:`nwave_param.core.trace`) and places its populations on the chip's cores by the
vendor's documented rules, naming the rule a network breaks; ``nwp.regroup_(model, example)``
orders each hidden population's neurons for the chip's sign-sharing blocks.

Imports the core and the base; nothing imports it but the public names and the demo.
"""

from nwave_param.placement.network import place
from nwave_param.placement.regroup import Regrouping, regroup_
from nwave_param.placement.result import Placement, Population

__all__ = ["Placement", "Population", "Regrouping", "place", "regroup_"]
