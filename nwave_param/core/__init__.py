"""The constraint core: what ``nwp.register(model)`` builds and what training uses.

* :mod:`.parametrization`: ``ChipConstraint``, the parametrization each tracked weight carries;
* :mod:`.registry`: ``register``, ``Registry``: the configuration and the lifecycle
  (prepare, train, squash);
* :mod:`.discovery`: which weights of a model are tracked, and how each reads;
* :mod:`.trace`: the network read from one traced forward (synapses, populations, channels);
* :mod:`.neurons`: which modules are spiking neurons (snnTorch, Norse, the chip's own);
* :mod:`.state`: state-dict keys, the load hooks, ``plain_state_dict``;
* :mod:`.report`: ``Report``: per-weight rows and totals;
* :mod:`.schedule`: ``Schedule``: the training recipe;
* :mod:`.loss`: the penalties under the vendor's names (public as :mod:`nwave_param.loss`).

Imports the base (the root modules) and the engine (:mod:`nwave_param._engine`); never
:mod:`nwave_param.checkpoints`, :mod:`nwave_param.placement` or the demo.
"""
