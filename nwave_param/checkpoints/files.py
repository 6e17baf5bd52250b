"""Checkpoint files: PyTorch and safetensors, read safely, written all or none.

* Reading: ``torch.load(..., weights_only=True, map_location="cpu")`` (a checkpoint never runs
  code) or the ``safetensors`` package for ``*.safetensors``, bounded by ``--max-bytes`` twice:
  before loading, by what loading allocates (the uncompressed sizes of a zip archive's entries,
  or the size of a legacy file, the format told by the file's leading bytes as torch tells it);
  after loading and before any computation, by what computing with its tensors materializes
  (an expanded tensor counts every element it reads as).  A structure nested too deep, or
  containing itself, is refused before anything walks it recursively.
* Writing: :func:`save` into :class:`~nwave_param.checkpoints.outputs.Outputs`, which writes one
  command's files all or none.
* nwave_param's descriptions (the ``..._extra_state`` tensors a registered model saves beside a
  weight) are ordinary tensors in a safetensors file; version 0.2 wrote them, as dicts, into the
  metadata, each as a JSON string under its own key, and such files are still read.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nwave_param.checkpoints.outputs import Outputs
from nwave_param.core.state import is_description_key
from nwave_param.description import decode
from nwave_param.errors import CheckpointError, one_line, reason
from nwave_param.sharing import storage_of, view_of

__all__ = ["Checkpoint", "is_safetensors", "load", "parse_size", "refuse_computing_more", "require_safetensors", "save"]

INSTALL_SAFETENSORS = "pip install 'nwave-param[safetensors]'"
# torch.load tells its two formats apart by their first bytes (torch.serialization._is_zipfile):
# a zip archive's local-header signature, or (before torch 1.6) the pickled magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]
MAX_DEPTH = 100  # containers inside containers; a training checkpoint nests a handful


@dataclass(eq=False)
class Checkpoint(Mapping):
    """A loaded checkpoint: the object on disk and the state_dict inside it (``under`` its key).

    It reads as its state_dict, so :func:`nwave_param.check_state_dict` and
    :func:`nwave_param.project_state_dict` take it as they take any state_dict; they name its
    ``path`` in their errors, and projecting it gives a new one, the whole ``container``.

    For a safetensors file, ``container`` is the state_dict, nwave_param's descriptions included
    (those of version 0.2 taken from the metadata), and ``metadata`` holds the rest of the metadata.
    """

    path: str
    container: object
    state_dict: Mapping[str, object]
    under: str | None
    metadata: dict[str, str] | None = None

    def __getitem__(self, key: str) -> object:
        return self.state_dict[key]

    def __iter__(self):
        return iter(self.state_dict)

    def __len__(self) -> int:
        return len(self.state_dict)


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def parse_size(text: str) -> int:
    """``"4G"`` -> 4 * 2**30: a whole or decimal number of bytes, optionally K, M, G or T (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"expected a size such as 500M or 4G, got {text!r}")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def human_size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            break
    return f"{count:.1f} {unit}"


# --- reading -----------------------------------------------------------------------------------


def require_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError(f"safetensors files need the safetensors package: {INSTALL_SAFETENSORS}") from None
    return safetensors


def _open_regular_file(path: str) -> bytes:
    """The first 16 bytes of ``path``, after checking that it is a readable regular file."""
    if os.path.isdir(path):
        raise CheckpointError(f"{one_line(path)} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"{one_line(path)}: no such file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{one_line(path)} is not a regular file")
    try:
        with open(path, "rb") as stream:
            return stream.read(16)
    except OSError as error:
        raise CheckpointError(f"cannot read {one_line(path)}: {reason(error)}") from None


# how the bound is named in a refusal, and an example of a larger one: on the command line, in Python
COMMAND_LINE = ("--max-bytes", "--max-bytes 16G")
PYTHON = ("max_bytes", "max_bytes=16 * 2**30")


def _refuse_larger(path: str, what: str, needed: int, max_bytes: int, detail: str = "", option: tuple[str, str] = COMMAND_LINE) -> None:
    if needed > max_bytes:
        name, example = option
        raise CheckpointError(
            f"{one_line(path)}: {what} takes {human_size(needed)}{detail}, more than {name} {human_size(max_bytes)}; "
            f"pass a larger {name} (e.g. {example}) if this machine has the memory"
        )


def _torch_size(path: str, head: bytes) -> int:
    """Bytes that loading ``path`` allocates at most, read without loading it, in the format its
    first bytes name (a legacy file with a zip archive appended is a legacy file, as torch reads it)."""
    if head.startswith(_ZIP_MAGIC):
        try:  # the uncompressed sizes: a compressed entry must not hide a large tensor
            with zipfile.ZipFile(path) as archive:
                return sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            raise CheckpointError(f"{one_line(path)} is not a readable PyTorch checkpoint (a damaged or truncated zip archive)") from None
    if head.startswith(_LEGACY_MAGIC):
        return os.path.getsize(path)  # the legacy format is not compressed
    if head[8:10] == b'{"':
        raise CheckpointError(f"{one_line(path)} looks like a safetensors file: name it *.safetensors")
    raise CheckpointError(f"{one_line(path)}: not a PyTorch or safetensors checkpoint")


def _load_torch(path: str, head: bytes, max_bytes: int) -> object:
    _refuse_larger(path, "loading it", _torch_size(path, head), max_bytes)
    try:
        with warnings.catch_warnings():  # torch's deprecation notices about what a file holds: not the user's to fix
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file
        if "unsupported global" in str(error).lower():
            raise CheckpointError(
                f"{one_line(path)} holds pickled Python objects (a full model?), which could run code when loaded; "
                "save model.state_dict() instead"
            ) from None
        raise CheckpointError(f"{one_line(path)} is not a readable PyTorch checkpoint ({reason(error)})") from None


def _load_safetensors(path: str, max_bytes: int) -> tuple[dict, dict[str, str]]:
    safetensors = require_safetensors()
    _refuse_larger(path, "loading it", os.path.getsize(path), max_bytes)  # not compressed: the file bounds its tensors
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # SafetensorError and the like: a bad header or body
        raise CheckpointError(f"{one_line(path)}: not a PyTorch or safetensors checkpoint ({reason(error)})") from None
    return tensors, metadata


def _descriptions_from_metadata(metadata: dict[str, str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Split ``metadata`` into the dict descriptions version 0.2 kept there (decoded) and the rest."""
    found, rest = {}, {}
    for key, text in metadata.items():
        try:
            value = json.loads(text) if is_description_key(key) else None
        except ValueError:
            value = None
        if decode(value) is not None:
            found[key] = value
        else:
            rest[key] = text
    return found, rest


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, Tensor) for v in obj.values())
    )


def _children(obj: object):
    """The items of a container (what :func:`with_values` walks into), None for anything else."""
    if isinstance(obj, Mapping):
        return iter(obj.items())
    if isinstance(obj, (list, tuple)):
        return enumerate(obj)
    return None


def _tensors_in(path: str, obj: object) -> dict[str, Tensor]:
    """Every tensor in ``obj`` by where it sits (``state_dict/fc.weight``), each container read once.

    Refuses a structure nested deeper than :data:`MAX_DEPTH` or containing itself, reading it
    without recursion, so that whatever walks it afterwards (copying, saving) may recurse.
    """
    found: dict[str, Tensor] = {}
    height: dict[int, int] = {}  # a container read -> the most containers on a path down from it, itself included

    def too_deep(where: str) -> CheckpointError:
        return CheckpointError(
            f"{one_line(path)}: containers nested more than {MAX_DEPTH} levels deep (at {one_line(where)}); "
            "a checkpoint is a state_dict, or a dict holding one"
        )

    if _children(obj) is None:
        return found
    stack = [[obj, "", _children(obj), 0]]  # the path down: container, where, its items left, its tallest child
    on_path = {id(obj)}
    while stack:
        frame = stack[-1]
        for key, child in frame[2]:
            where = f"{frame[1]}/{key}" if frame[1] else str(key)
            children = _children(child)
            if isinstance(child, Tensor):
                found.setdefault(where, child)
            elif children is None:
                continue
            elif id(child) in on_path:
                raise CheckpointError(
                    f"{one_line(path)}: {one_line(where)} is a container it sits in (a structure holding itself, which no checkpoint is)"
                )
            elif id(child) in height:  # already read through another key: only its height counts
                if len(stack) + height[id(child)] > MAX_DEPTH:
                    raise too_deep(where)
                frame[3] = max(frame[3], height[id(child)])
            elif len(stack) == MAX_DEPTH:
                raise too_deep(where)
            else:
                stack.append([child, where, children, 0])
                on_path.add(id(child))
                break
        else:  # every item read
            stack.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[3] + 1
            if stack:
                stack[-1][3] = max(stack[-1][3], frame[3] + 1)
    return found


# sparse layouts: the tensors that hold their values
_SPARSE_PARTS = {
    torch.sparse_coo: ("_indices", "_values"),
    torch.sparse_csr: ("crow_indices", "col_indices", "values"),
    torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
    torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
    torch.sparse_bsc: ("ccol_indices", "row_indices", "values"),
}


def _computed_bytes(tensor: Tensor) -> int:
    """The bytes computing with ``tensor`` materializes: ``numel * element_size`` of a dense
    tensor however little it stores (an expanded tensor reads one value as many), those of the
    parts of a sparse one; none for a meta tensor, which holds no values."""
    if tensor.is_meta:
        return 0
    parts = _SPARSE_PARTS.get(tensor.layout)
    if parts is not None:
        return sum(_computed_bytes(getattr(tensor, part)()) for part in parts)
    return tensor.numel() * tensor.element_size()


def refuse_computing_more(path: str, obj: object, max_bytes: int, option: tuple[str, str] = COMMAND_LINE) -> None:
    """Refuse, before any computation, an object (a checkpoint, a state_dict) whose tensors
    materialize more than ``max_bytes``, naming the bound as ``option`` (:data:`COMMAND_LINE`, :data:`PYTHON`)."""
    views = {view_of(t): (where, t) for where, t in _tensors_in(path, obj).items()}
    sizes = {where: _computed_bytes(t) for where, t in views.values()}
    needed = sum(sizes.values())
    if needed <= max_bytes:
        return
    largest = max(sizes, key=sizes.get)
    tensor = dict(views.values())[largest]
    stored = tensor.untyped_storage().nbytes() if storage_of(tensor) else sizes[largest]
    expanded = f", stored in {human_size(stored)}" if stored < sizes[largest] else ""
    detail = f" ({one_line(largest)} of shape {tuple(tensor.shape)}: {human_size(sizes[largest])}{expanded})"
    _refuse_larger(path, "computing with its tensors", needed, max_bytes, detail, option)


def load(path: str, max_bytes: int) -> Checkpoint:
    """Load ``path`` (``*.safetensors`` with safetensors, anything else with torch) and find its state_dict."""
    head = _open_regular_file(path)
    if is_safetensors(path):
        tensors, metadata = _load_safetensors(path, max_bytes)
        descriptions, rest = _descriptions_from_metadata(metadata)
        state_dict = OrderedDict({**tensors, **descriptions})
        return Checkpoint(path, state_dict, state_dict, None, rest)
    obj = _load_torch(path, head, max_bytes)
    refuse_computing_more(path, obj, max_bytes)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            return Checkpoint(path, obj, obj[key], key)
    if _is_state_dict(obj):
        return Checkpoint(path, obj, obj, None)
    raise CheckpointError(f"{one_line(path)} holds no state_dict (expected one, or a dict with it under 'state_dict' or 'model')")


# --- writing -----------------------------------------------------------------------------------


def _safetensors_content(checkpoint: Checkpoint, path: str) -> tuple[dict, dict[str, str], list[str]]:
    """The tensors and metadata of a safetensors file holding ``checkpoint``'s state_dict, and notes."""
    if checkpoint.under is not None:
        others = [repr(k) for k in checkpoint.container if k != checkpoint.under]
        if others:
            raise CheckpointError(
                f"cannot write {one_line(path)}: a safetensors file holds only tensors, and {one_line(checkpoint.path)} also holds "
                f"{one_line(', '.join(others))} beside its state_dict; write a .pt file instead"
            )
    metadata = dict(checkpoint.metadata) if checkpoint.metadata is not None else {"format": "pt"}
    tensors, refused = {}, []
    for key, value in checkpoint.state_dict.items():
        if isinstance(value, Tensor) and value.layout == torch.strided:
            tensors[key] = value
        else:
            refused.append(key)
    if refused:
        raise CheckpointError(
            f"cannot write {one_line(path)}: a safetensors file holds only dense tensors, not {one_line(', '.join(refused))}; "
            "write a .pt file instead"
        )
    tensors, notes = _unshared(tensors)
    return tensors, metadata, notes


def _unshared(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """safetensors cannot share memory: ties and views become equal, separate, contiguous copies."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault(storage_of(tensor) or (id(tensor),), []).append(key)
    result, copied = {}, []
    for keys in groups.values():
        for i, key in enumerate(keys):
            tensor = tensors[key]
            result[key] = tensor.clone(memory_format=torch.contiguous_format) if i else tensor.contiguous()
        if len(keys) > 1:
            copied.append(", ".join(keys))
    notes = [f"written as separate, equal copies (safetensors cannot share memory): {group}" for group in copied]
    return result, notes


def save(outputs: Outputs, checkpoint: Checkpoint, path: str) -> list[str]:
    """Add ``checkpoint.container`` to ``outputs`` as ``path``, as safetensors for ``*.safetensors``.

    Returns notes about what the format could not keep as it was.
    """
    if not is_safetensors(path):
        outputs.add(path, lambda stream: torch.save(checkpoint.container, stream))
        lost = [key for key in checkpoint.metadata or () if key != "format"]  # "format": "pt" says what a .pt is
        return [f"safetensors metadata a .pt file has no place for, not kept: {', '.join(lost)}"] if lost else []
    safetensors = require_safetensors()
    tensors, metadata, notes = _safetensors_content(checkpoint, path)
    try:
        data = safetensors.torch.save(tensors, metadata=metadata)
    except Exception as error:  # a dtype safetensors cannot hold, and the like
        raise CheckpointError(f"cannot write {one_line(path)}: {reason(error)}") from None
    outputs.add(path, lambda stream: stream.write(data))
    return notes
