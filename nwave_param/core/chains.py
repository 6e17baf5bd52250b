"""The ``parametrize`` chain a constraint sits in: the links before it, the tensors the chain
stores, the latent weight, and writing a value through the earlier links' ``right_inverse``."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from nwave_param import functional
from nwave_param.core.parametrization import ChipConstraint
from nwave_param.core.report import build_report
from nwave_param.spec import ChipSpec

__all__ = ["latent", "links_before", "originals", "write_through_chain"]


def links_before(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> list[nn.Module]:
    """The parametrizations before ``constraint`` in the chain of ``module.<tensor_name>``."""
    chain = list(module.parametrizations[tensor_name])
    return chain[: next(i for i, link in enumerate(chain) if link is constraint)]


def originals(module: nn.Module, tensor_name: str) -> list[Tensor]:
    """The tensors the chain of ``module.<tensor_name>`` stores (``original``, or ``original0..k``)."""
    chain = module.parametrizations[tensor_name]
    return [chain.original] if chain.is_tensor else [getattr(chain, f"original{i}") for i in range(chain.ntensors)]


def latent(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> Tensor:
    """The latent weight: what the chain computes up to ``constraint`` (the stored Parameter
    itself when the constraint comes first)."""
    before = links_before(module, tensor_name, constraint)
    if not before:
        return module.parametrizations[tensor_name].original
    value = before[0](*originals(module, tensor_name))
    for link in before[1:]:
        value = link(value)
    return value


def write_through_chain(module: nn.Module, tensor_name: str, constraint: ChipConstraint, name: str, target: Tensor, spec: ChipSpec) -> None:
    """Write ``target`` as the latent value through the earlier parametrizations' right_inverse,
    read it back, and accept it only if it is finite and mappable.

    A chain's forward may round the value an ulp past the limit (weight_norm's ``g * v / |v|``):
    then the value is projected again a few ulps inside, up to 8 times, without ``spec.bits``
    (a grid value cannot move).
    """
    layout, limit = constraint.layout, spec.limit
    for attempt in range(8):
        setattr(module, tensor_name, target)  # nwave_param's right_inverse is the identity
        held = latent(module, tensor_name, constraint)
        if not bool(torch.isfinite(held).all()):
            raise ValueError(
                f"{name}: {_names(module, tensor_name, constraint)} turns the projected value into NaN or inf "
                "(weight_norm cannot hold an all-zero row); every weight was restored"
            )
        if build_report([name], [held], [layout], spec, 2).is_mappable:
            return
        if spec.bits is not None:
            raise ValueError(
                f"{name}: {_names(module, tensor_name, constraint)} moves the projected values off the {spec.bits}-bit grid "
                "(its forward rounds them); every weight was restored. Fold that parametrization into "
                "the weight first: torch.nn.utils.parametrize.remove_parametrizations(module, name, "
                "leave_parametrized=True) after reg.remove(), then register again"
            )
        limit -= torch.finfo(held.dtype).eps * spec.limit * 2**attempt
        target = functional.project(held, layout, dataclasses.replace(spec, limit=limit))
    raise ValueError(
        f"{name}: {_names(module, tensor_name, constraint)} cannot hold a mappable value here (orthogonal cannot hold a "
        "sign-aligned matrix); every weight was restored"
    )


def _names(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> str:
    return " -> ".join(type(link).__name__ for link in links_before(module, tensor_name, constraint))
