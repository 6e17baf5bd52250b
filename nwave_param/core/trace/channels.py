"""Which input channels reach each element of a tensor, on the way from the input to the first
neurons: the front end's one-to-one rule read from what the network computes."""

from __future__ import annotations

import torch
from torch import Tensor

from nwave_param.core.trace.records import UNKNOWN

__all__ = ["channel_probe", "decoded_channels", "fan_of", "merged_channels"]


def channel_probe(tensor: Tensor, channels: tuple, offset: int) -> Tensor:
    """``tensor``'s shape, each element holding the index (plus ``offset``) of its position along
    the channels' dim, as float64: what a picking op moves shows where each position went."""
    dim, _ = channels
    if dim is None:
        return torch.full(tensor.shape, float(offset), dtype=torch.float64)
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    return (torch.arange(tensor.shape[dim], dtype=torch.float64) + offset).view(shape).expand(tensor.shape).clone()


def decoded_channels(probe: Tensor, table: list[frozenset]) -> object:
    """The channels of an op's result from its probe: each position's channels from ``table``
    (-1: none), read as one dim along which they vary (and are constant along the others)."""
    if probe.numel() == 0:
        return (None, (frozenset(),))
    distinct: dict[frozenset, int] = {}
    sets = [frozenset(), *table]  # position -1 holds no channel
    lookup = torch.tensor([distinct.setdefault(s, len(distinct)) for s in sets])
    ids = lookup[(probe + 1).long()]  # equal sets, equal ids: the slices of a stack carry the same channels
    by_id = list(distinct)
    varying = [d for d in range(ids.dim()) if ids.shape[d] > 1 and not bool((ids == ids.narrow(d, 0, 1)).all())]
    if not varying:
        return (None, (by_id[int(ids.reshape(-1)[0])],))
    if len(varying) > 1:
        return UNKNOWN
    d = varying[0]
    line = ids.movedim(d, -1).reshape(-1, ids.shape[d])
    if not bool((line == line[:1]).all()):
        return UNKNOWN
    return (d, tuple(by_id[int(v)] for v in line[0].tolist()))


def merged_channels(channels: object) -> object:
    """All the channels of ``channels`` reaching every element (a reduction over their dim)."""
    if channels is None or channels == UNKNOWN:
        return channels
    return (None, (frozenset().union(*channels[1]),))


def fan_of(channels: object, neurons_dim: int | None, neurons: int) -> tuple[int, int] | None:
    """``(fan-in, fan-out)``: the most input channels reaching one neuron, and the most neurons one
    channel reaches; None when the channels are not known."""
    if channels is None or channels == UNKNOWN:
        return None
    dim, sets = channels
    if dim is None:
        sets = sets * neurons  # every neuron gets them all
    elif dim != neurons_dim:
        return None
    fan_in = max((len(s) for s in sets), default=0)
    counts: dict[int, int] = {}
    for s in sets:
        for c in s:
            counts[c] = counts.get(c, 0) + 1
    return fan_in, max(counts.values(), default=0)
