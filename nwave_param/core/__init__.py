"""The constraint core: what ``nwp.register(model)`` builds and what training uses.

* :mod:`.settings`: ``RegistrationSettings`` and ``Registration``, and what each thread computes with;
* :mod:`.parametrization`: ``ChipConstraint``, the parametrization each tracked weight carries;
* :mod:`.passes`: the cached pass (``reg.cached()``): every weight computed once per pass;
* :mod:`.classes`: a class of its own for each constrained module, so copies stay independent;
* :mod:`.chains`: the ``parametrize`` chain a constraint sits in;
* :mod:`.registry`: ``register``, ``registry_of``, ``Registry``: the configuration and the
  lifecycle (prepare, train, squash);
* :mod:`.discovery`: which weights of a model are tracked, and how each reads;
* :mod:`.trace`: the network read from one traced forward (synapses, populations, channels);
* :mod:`.neurons`: which modules are spiking neurons (snnTorch, Norse);
* :mod:`.state`: state-dict keys, the load hooks, ``plain_state_dict``;
* :mod:`.report`: ``Report`` and ``WeightReport``;
* :mod:`.schedule`: ``Schedule``: the training rule;
* :mod:`.loss`: the penalties under the vendor's names (public as :mod:`nwave_param.loss`).

Imports the base (the root modules) and the engine (:mod:`nwave_param._engine`); never
:mod:`nwave_param.checkpoints`, :mod:`nwave_param.placement` or the demo.  Within it, following
``register(model)`` descends: registry, then discovery (and the trace), then the constraint and
its pieces, then settings.
"""
