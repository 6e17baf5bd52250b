"""Which ops are synapses: the op families a trace reads as weights applied to activations, and which ops are elementwise."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = ["CELL", "CONV", "CONV_TRANSPOSE", "MATMUL", "MIXED", "PRODUCTS", "RNN", "RNN_OPS", "SYNAPSES", "is_elementwise", "kernel_reach"]


MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "addmm", "baddbmm", "addmv", "addbmm"}


CONV = {"conv1d", "conv2d", "conv3d"}


CONV_TRANSPOSE = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


RNN = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


CELL = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1, "rnn_relu_cell": 1}


SYNAPSES = {"linear", "bilinear", "einsum"} | MATMUL | CONV | CONV_TRANSPOSE


PRODUCTS = {"mul", "__mul__", "__rmul__", "mul_", "multiply"}


_ALSO_ELEMENTWISE = {"dropout", "dropout_", "alpha_dropout", "feature_dropout", "bernoulli", "copy_", "zero_", "fill_", "masked_fill_"}


_RENAMED = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "and": "bitwise_and",
    "or": "bitwise_or",
    "xor": "bitwise_xor",
    "invert": "bitwise_not",
    "multiply": "mul",
    "subtract": "sub",
    "divide": "div",
    "true_divide": "div",
}


MIXED = "a mixing op over activations"  # a fixed synapse with no tensor of weights (a sum over neurons, a softmax, a pooling)


@functools.cache
def is_elementwise(name: str) -> bool:
    """Whether torch's op ``name`` computes each output element from the same element of its
    operands: an aten op tagged pointwise (``mul``, ``__rmul__``, ``sigmoid_``...), or dropout."""
    if name in _ALSO_ELEMENTWISE:
        return True
    base = name[3:-2] if name.startswith("__r") and name.endswith("__") else name.strip("_")
    packet = getattr(torch.ops.aten, _RENAMED.get(base, base), None)
    overloads = packet.overloads() if isinstance(packet, torch._ops.OpOverloadPacket) else ()
    return any(torch.Tag.pointwise in getattr(packet, overload).tags for overload in overloads)


RNN_OPS = set(RNN) | set(CELL)


def _per_dim(value: object, dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def kernel_reach(
    transposed: bool, inputs: Sequence[int], outputs: Sequence[int], kernel: Sequence[int], stride=1, padding=0, dilation=1
) -> int:
    """The most output positions one input position reaches through a convolution's kernel, each
    through another kernel offset: 1 where each input feeds one output position (a kernel of 1, or
    a stride past the kernel's span), more where the kernel's windows overlap.

    A convolution's output ``p`` reads input ``q = p * stride - padding + i * dilation`` through
    offset ``i`` (a transposed one's input ``q`` writes output ``q * stride - padding + i *
    dilation``), dim by dim; the reach is the product of each dim's largest count.

    Args:
        transposed: a transposed convolution.
        inputs, outputs: the spatial lengths of its input and output.
        kernel: the kernel's spatial lengths.
        stride, padding, dilation: as torch takes them (an int or one per dim; ``"valid"`` or
            ``"same"`` padding).

    Returns:
        The reach, at least 1 (0 only for an empty map).
    """
    dims = len(kernel)
    stride, dilation = _per_dim(stride, dims), _per_dim(dilation, dims)
    if padding == "valid":
        padding = 0
    elif padding == "same":  # torch pads the smaller half before
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    return math.prod(
        _reach_along(transposed, int(l_in), int(l_out), int(k), s, p, d)
        for l_in, l_out, k, s, p, d in zip(inputs, outputs, kernel, stride, _per_dim(padding, dims), dilation)
    )


@functools.cache
def _reach_along(transposed: bool, l_in: int, l_out: int, k: int, s: int, p: int, d: int) -> int:
    """:func:`kernel_reach` along one dim: the most outputs one input reaches, counted in O(1)
    for each input position (a long audio map with a long kernel stays cheap), and kept."""
    best = 0
    for q in range(l_in):
        if transposed:  # input q writes output q * s - p + i * d for offsets i in [0, k)
            first, last = max(0, -((q * s - p) // d)), min(k - 1, (l_out - 1 + p - q * s) // d)
            count = last - first + 1
        else:  # output o reads input q through offset i where o * s + i * d = q + p, 0 <= i < k
            x = q + p
            first, last = max(0, -((-(x - (k - 1) * d)) // s)), min(l_out - 1, x // s)
            common = math.gcd(s, d)
            if x % common:
                continue
            period = d // common  # the outputs o with o * s = x (mod d): o = start (mod period)
            start = (x // common) * pow(s // common, -1, period) % period if period > 1 else 0
            count = (last - start) // period - (first - 1 - start) // period if last >= first else 0
        best = max(best, count)
    return best
