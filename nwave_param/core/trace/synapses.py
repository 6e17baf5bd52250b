"""Which ops are synapses: the op families a trace reads as weights applied to activations, and which ops are elementwise."""

from __future__ import annotations

import functools

import torch

__all__ = ["CELL", "CONV", "CONV_TRANSPOSE", "MATMUL", "MIXED", "PRODUCTS", "RNN", "RNN_OPS", "SYNAPSES", "is_elementwise"]


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
