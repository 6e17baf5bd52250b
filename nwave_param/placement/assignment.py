"""Populations on the chip's cores, in blocks: recurrent ones whole in one core (an exact
search), feed-forward ones in the room left, split where they must be."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nwave_param.errors import one_line
from nwave_param.placement.result import Population
from nwave_param.spec import ChipSpec

__all__ = ["assign"]


@dataclass
class _Core:
    """A core's room: whole blocks free, and its short last block (``capacity % group_size``
    neurons, for a population's short last block)."""

    blocks: int
    tail: int
    tail_free: bool = True


def _blocks(neurons: int, group_size: int) -> tuple[int, int]:
    """Blocks a population of ``neurons`` takes, and how many neurons its last block holds."""
    count = -(-neurons // group_size)
    return count, neurons - (count - 1) * group_size


def assign(populations: list[Population], spec: ChipSpec) -> tuple[list[Population], list[str]]:
    """Recurrent populations whole in one core each (an exact search); feed-forward ones in the
    blocks left, whole where a core holds them, else split between blocks.  Each population and
    each piece starts at a block of its core."""
    g, cores = spec.group_size, spec.cores
    total, capacity = sum(p.neurons for p in populations), sum(cores)
    largest = max(cores)
    problems = []
    if total > capacity:
        problems.append(f"the network has {total} neurons; the chip holds {capacity} ({' + '.join(map(str, cores))})")
    for p in populations:
        if p.recurrent and p.neurons > largest:
            problems.append(
                f"{one_line(p.name)}: a recurrent population of {p.neurons} neurons sits whole in one core, "
                f"and the largest core holds {largest}"
            )
    if problems:
        return populations, problems
    recurrent = [i for i, p in enumerate(populations) if p.recurrent]
    forward = [i for i, p in enumerate(populations) if not p.recurrent]
    sizes = [populations[i].neurons for i in recurrent]
    any_recurrent_fit = False
    for where in _recurrent_assignments(sizes, cores, g):
        any_recurrent_fit = True
        found = _with_forward(populations, recurrent, where, forward, cores, g)
        if found is not None:
            return found, []
    if not any_recurrent_fit:
        listed = ", ".join(f"{one_line(populations[i].name)} ({populations[i].neurons})" for i in recurrent)
        return populations, [
            f"the recurrent populations {listed} each sit whole in one core, in blocks of {g} from its first neuron, and no "
            f"assignment fits them in cores ({', '.join(map(str, cores))})"
        ]
    padded = sum(_blocks(p.neurons, g)[0] * g for p in populations)
    return populations, [
        f"each population starts at a block of {g} in its core, and a split one is cut between blocks: padded so, the "
        f"{len(populations)} populations need up to {padded} neurons, and no placement fits them in cores ({', '.join(map(str, cores))})"
    ]


def _recurrent_assignments(sizes: list[int], cores: Sequence[int], g: int):
    """Every way to put each recurrent population whole in one core, in blocks (the short last
    block of a population may take a core's short last block), cores of equal room tried once.
    Yields ``(core, in its short last block)`` per population."""
    rooms = [_Core(c // g, c % g) for c in cores]
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    where = [(0, False)] * len(sizes)

    def search(k: int):
        if k == len(order):
            yield list(where)
            return
        i, tried = order[k], set()
        count, last = _blocks(sizes[i], g)
        for core, room in enumerate(rooms):
            for tail in (False, True):
                needed = count - tail
                fits = room.blocks >= needed and (not tail or (room.tail_free and last <= room.tail))
                state = (room.blocks, room.tail_free, room.tail, tail)
                if not fits or state in tried:
                    continue
                tried.add(state)
                room.blocks -= needed
                room.tail_free = room.tail_free and not tail
                where[i] = (core, tail)
                yield from search(k + 1)
                room.blocks += needed
                if tail:
                    room.tail_free = True

    yield from search(0)


def _with_forward(populations, recurrent, where, forward, cores, g) -> list[Population] | None:
    """The placement with the recurrent populations where ``where`` puts them and the
    feed-forward ones in the blocks left, or None when they do not fit."""
    rooms = [_Core(c // g, c % g) for c in cores]
    pieces: dict[int, list[tuple[int, int, bool]]] = {}  # population -> (core, neurons, ends in the core's short last block)
    for i, (core, tail) in zip(recurrent, where):
        count, _ = _blocks(populations[i].neurons, g)
        rooms[core].blocks -= count - tail
        rooms[core].tail_free = rooms[core].tail_free and not tail
        pieces[i] = [(core, populations[i].neurons, tail)]
    # the cores' short last blocks take feed-forward populations' short last blocks, the largest first
    in_tail: dict[int, int] = {}
    for core in sorted((c for c, room in enumerate(rooms) if room.tail_free and room.tail), key=lambda c: -rooms[c].tail):
        fitting = [i for i in forward if i not in in_tail and _blocks(populations[i].neurons, g)[1] <= rooms[core].tail]
        if fitting:
            chosen = max(fitting, key=lambda i: _blocks(populations[i].neurons, g)[1])
            in_tail[chosen] = core
            rooms[core].tail_free = False
    needed = sum(_blocks(populations[i].neurons, g)[0] - (i in in_tail) for i in forward)
    if needed > sum(room.blocks for room in rooms):
        return None
    for i in forward:
        count, last = _blocks(populations[i].neurons, g)
        tail_core = in_tail.get(i)
        whole = count - (tail_core is not None)
        if tail_core is not None and rooms[tail_core].blocks >= whole:  # all of it where its last block is
            rooms[tail_core].blocks -= whole
            pieces[i] = [(tail_core, populations[i].neurons, True)]
            continue
        holding = [c for c, room in enumerate(rooms) if room.blocks >= whole]
        if tail_core is None and holding:  # whole in the fullest core that holds it
            core = min(holding, key=lambda c: (rooms[c].blocks, c))
            rooms[core].blocks -= whole
            pieces[i] = [(core, populations[i].neurons, False)]
            continue
        left, remaining, pieces[i] = whole, populations[i].neurons - (0 if tail_core is None else last), []
        in_tail_core = 0  # whole blocks in the core of its short last block: one piece with it, laid out before it
        for core in sorted(range(len(rooms)), key=lambda c: c != tail_core):
            take = min(rooms[core].blocks, left)
            if take:
                rooms[core].blocks, left = rooms[core].blocks - take, left - take
                neurons = min(take * g, remaining)
                remaining -= neurons
                if core == tail_core:
                    in_tail_core = neurons
                else:
                    pieces[i].append((core, neurons, False))
        if tail_core is not None:
            pieces[i].append((tail_core, in_tail_core + last, True))
    return _laid_out(populations, pieces, cores, g)


def _laid_out(
    populations: list[Population], pieces: dict[int, list[tuple[int, int, bool]]], cores: Sequence[int], g: int
) -> list[Population]:
    """Each piece's first neuron in its core: block-aligned, the piece that ends in the core's
    short last block laid out last."""
    used = [0] * len(cores)
    offsets: dict[int, dict[int, int]] = {i: {} for i in pieces}
    for _tail, i, k in sorted((tail, i, k) for i, parts in pieces.items() for k, (_, _, tail) in enumerate(parts)):  # tail pieces last
        core, neurons, _ = pieces[i][k]
        offsets[i][core] = used[core]
        used[core] += -(-neurons // g) * g
    return [
        Population(p.name, p.neurons, p.recurrent, p.front_end, {c: n for c, n, _ in pieces[i]}, offsets[i])
        for i, p in enumerate(populations)
    ]
