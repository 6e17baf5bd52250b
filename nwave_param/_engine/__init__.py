"""The engine (private): the penalties and the hardened values of all tracked weights at once, in
a number of kernels that does not grow with the weights' sizes.

* :mod:`.plans`: how the work is laid out: which weights share a pack, in which chunks; and the
  pieces both computations use (``Shared``, ``raw_parts``, ``assembled``, ``in_dtype``);
* :mod:`.penalties`: the penalty sums of all weights as one autograd node;
* :mod:`.hardening`: the values a pass computes with, all weights at once.

Imports run one way: ``penalties`` and ``hardening`` import ``plans``, never each other.  It
computes what :mod:`nwave_param.functional` defines (the hardened values bit for bit, the
penalties within float rounding: each module says how exactly), and imports only the base (the
root modules: ``spec``, ``layout``, ``functional``, ``_memo``); nothing above it.
"""
