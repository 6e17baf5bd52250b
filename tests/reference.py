"""The reference, written from the spec alone: it never calls nwave_param internals.

For every tracked weight it builds the *dense* connectivity matrix explicitly (rows = output
neurons, columns = input channel x kernel offset, zeros where a grouped convolution connects
nothing), splits recurrent weights into their gate populations, cuts each population into blocks
of ``group_size`` rows and sums ``min(P, Q)`` block column by block column with plain Python loops
and torch ops (so that autograd through the reference gives the reference gradient).
"""

from __future__ import annotations

import math

import torch
from torch import nn

DTYPE = torch.float64

NORMS_AND_EMBEDDINGS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.Embedding, nn.EmbeddingBag,
)
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_weight_name(local):
    return local == "weight" or local.startswith("weight_") or local.endswith(("_weight", "_weights"))


def ref_tracked(model):
    """[(dotted name, module, local name)] of the weights the spec tracks, in named_parameters order.

    Call on an unregistered model.
    """
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, NORMS_AND_EMBEDDINGS):
            continue
        for local, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and is_weight_name(local):
                out.append((f"{mod_name}.{local}" if mod_name else local, module, local))
    return out


def ref_index_populations(module, local, shape):
    """The dense connectivity matrix of ``module.<local>`` as index matrices, one per population.

    Entry (i, j) is the flat index into the weight of M_ij, or -1 where M_ij is a structural
    zero (an (output, input) channel pair a grouped convolution does not connect).
    """
    shape = tuple(shape)
    K = math.prod(shape[2:])  # kernel offsets (1 for 2-dim weights)
    if isinstance(module, CONV_T):
        # weight (in, out/groups, *k); input channel ci of group g feeds outputs g*opg .. g*opg+opg-1
        g = module.groups
        n_in, opg = shape[0], shape[1]
        ipg = n_in // g
        n_out = opg * g
        rows = []
        for o in range(n_out):
            grp, oo = divmod(o, opg)
            row = [-1] * (n_in * K)
            for c in range(ipg):
                ci = grp * ipg + c
                for k in range(K):
                    row[ci * K + k] = (ci * opg + oo) * K + k  # flat index of weight[ci, oo, k]
            rows.append(row)
        populations = [rows]
    elif isinstance(module, CONV):
        # weight (out, in/groups, *k); output o of group g reads inputs g*ipg .. g*ipg+ipg-1
        g = module.groups
        n_out, ipg = shape[0], shape[1]
        opg = n_out // g
        n_in = ipg * g
        rows = []
        for o in range(n_out):
            grp = o // opg
            row = [-1] * (n_in * K)
            for c in range(ipg):
                ci = grp * ipg + c
                for k in range(K):
                    row[ci * K + k] = (o * ipg + c) * K + k  # flat index of weight[o, c, k]
            rows.append(row)
        populations = [rows]
    else:
        # neuron axis = dim 0, everything else flattened into columns
        n_out = shape[0]
        cols = math.prod(shape[1:])
        rows = [[o * cols + j for j in range(cols)] for o in range(n_out)]
        gates = 1
        if local.startswith(("weight_ih", "weight_hh")):
            if isinstance(module, (nn.LSTM, nn.LSTMCell)):
                gates = 4
            elif isinstance(module, (nn.GRU, nn.GRUCell)):
                gates = 3
        size = n_out // gates
        assert size * gates == n_out
        populations = [rows[q * size:(q + 1) * size] for q in range(gates)]
    idx = [torch.tensor(p, dtype=torch.long).reshape(len(p), -1) for p in populations]
    # sanity of the reference: every weight element appears exactly once in the dense matrix
    seen = torch.cat([i[i >= 0] for i in idx])
    assert torch.equal(seen.sort().values, torch.arange(math.prod(shape)))
    return idx


def dense(weight, idx):
    """The dense matrix M: weight elements where idx >= 0, explicit zeros elsewhere."""
    flat = weight.reshape(-1)
    zero = torch.zeros((), dtype=weight.dtype)
    return torch.where(idx >= 0, flat[idx.clamp(min=0)], zero)


def ref_dense_populations(module, local, weight):
    """The dense connectivity matrices of ``module.<local>`` holding ``weight``'s values, one per population."""
    return [dense(weight, idx) for idx in ref_index_populations(module, local, weight.shape)]


def blocks(n_rows, group_size):
    """Consecutive row blocks of group_size; the last one may be shorter."""
    return [list(range(s, min(s + group_size, n_rows))) for s in range(0, n_rows, group_size)]


def ref_sums(tracked, limit, power, group_size):
    """(magnitude sum, topology sum, N) as differentiable float64 tensors."""
    mag = torch.zeros((), dtype=DTYPE)
    top = torch.zeros((), dtype=DTYPE)
    n = 0
    for _, module, local in tracked:
        w = getattr(module, local)
        n += w.numel()
        for value in w.reshape(-1):
            mag = mag + torch.relu(torch.abs(value) - limit).pow(power)
        for m in ref_dense_populations(module, local, w):
            for rows in blocks(m.shape[0], group_size):
                p = sum(torch.relu(m[i]) for i in rows)   # one entry per column j
                q = sum(torch.relu(-m[i]) for i in rows)
                top = top + torch.minimum(p, q).sum()
    return mag, top, n


def ref_penalties(tracked, limit=0.9, power=2, group_size=5):
    mag, top, n = ref_sums(tracked, limit, power, group_size)
    return mag / n, top / n


def ref_block_columns(tracked, group_size):
    """For every tracked weight and every block column: the flat indices of its connected entries."""
    out = []
    for _, module, local in tracked:
        w = getattr(module, local)
        cols = []
        for idx in ref_index_populations(module, local, w.shape):
            for rows in blocks(idx.shape[0], group_size):
                for j in range(idx.shape[1]):
                    ks = idx[rows, j]
                    ks = ks[ks >= 0]
                    if len(ks):
                        cols.append(ks)
        out.append(cols)
    return out


def ref_constraints_hold(tracked, limit, group_size):
    """(every |w| <= limit, every block column single-signed)."""
    mag_ok, top_ok = True, True
    for (_, module, local), cols in zip(tracked, ref_block_columns(tracked, group_size)):
        flat = getattr(module, local).detach().reshape(-1)
        mag_ok &= bool((flat.abs() <= limit).all())
        for ks in cols:
            v = flat[ks]
            top_ok &= not (bool((v > 0).any()) and bool((v < 0).any()))
    return mag_ok, top_ok
