"""Read PEFT adapters from disk, validated against the served base model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as written by
Hugging Face PEFT's ``save_pretrained``. Two kinds are served:

* LoRA (``peft_type`` "LORA") on the seven Llama-family projections, and
* soft prompts (``peft_type`` "PROMPT_TUNING"), one ``prompt_embeddings`` tensor.

Everything that can be checked is checked from the config and the safetensors *header* before a
single tensor is read, so a registry can vet an upload cheaply (:func:`inspect_adapter`) and the
engine never half-loads a bad adapter (:func:`load_adapter` runs the same checks first). Every
refusal is an :class:`AdapterError` naming the adapter path and the offending thing.

The work is split three ways: :mod:`.peft_config` reads the config and applies the PEFT config
rules, :mod:`.safetensors_header` parses and checks the weights file's header, and this module
matches the tensors against the base model, plans each module and reads the tensors.
:func:`read_adapter_config` and :func:`adapter_kind` are re-exported from here.

Pickled weights (``.bin``, ``.pt``, ...) are refused and never unpickled: nothing here calls
``torch.load``, ``pickle`` or PEFT's own loaders.

Options the engine does not implement are refused by name rather than ignored, and so is any
config key loraplex does not know whose value is set: a future PEFT feature that changes the
maths must fail loudly, not serve subtly wrong outputs.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .adapter_errors import AdapterError, is_int
from .peft_config import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_kind,
    base_model_warnings,
    check_lora_config,
    check_prompt_config,
    lora_r,
    lora_scale,
    pattern_value,
    read_adapter_config,
)
from .safetensors_header import FLOAT_DTYPES, FLOAT_ITEMSIZE, TensorInfo, read_header

__all__ = [
    "PROJECTIONS",
    "AdapterError",
    "BaseModelShape",
    "LoraAdapter",
    "SoftPrompt",
    "read_adapter_config",
    "adapter_kind",
    "inspect_adapter",
    "load_adapter",
    "report_base_model",
]

log = logging.getLogger("loraplex.adapters")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_MAX_BYTES = 4 * 1024**3
# Bytes read (or scaled) per piece of a paced load: a few milliseconds of work.
READ_SLICE_BYTES = 1024**2

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_BLOCK_OF = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

PathLike = Union[str, os.PathLike]
Pace = Callable[[], AbstractContextManager]  # `with pace():` around each piece of a load


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: layer count, hidden size and each projection's weight shape.

    ``projection_shapes[proj]`` is ``(out_features, in_features)``, the shape of the base
    ``nn.Linear`` weight, for every name in :data:`PROJECTIONS`.
    """

    num_layers: int
    hidden_size: int
    projection_shapes: dict[str, tuple[int, int]]
    name_or_path: str = ""

    def __post_init__(self) -> None:
        missing = [p for p in PROJECTIONS if p not in self.projection_shapes]
        if missing:
            raise ValueError(f"BaseModelShape.projection_shapes lacks {missing}")
        for proj in PROJECTIONS:
            shape = tuple(self.projection_shapes[proj])
            if len(shape) != 2 or not all(is_int(d) and d > 0 for d in shape):
                raise ValueError(f"BaseModelShape.projection_shapes[{proj!r}] = {shape!r} is not (out, in)")
        if not (is_int(self.num_layers) and self.num_layers > 0):
            raise ValueError(f"BaseModelShape.num_layers must be a positive int, got {self.num_layers!r}")
        if not (is_int(self.hidden_size) and self.hidden_size > 0):
            raise ValueError(f"BaseModelShape.hidden_size must be a positive int, got {self.hidden_size!r}")

    @classmethod
    def from_hf_config(cls, config: Any, name_or_path: str | None = None) -> "BaseModelShape":
        """Shape of a Llama-family model from its ``transformers`` config (LlamaConfig and kin)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = int(config.intermediate_size)
        shapes = {
            "q_proj": (heads * head_dim, hidden),
            "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim),
            "gate_proj": (inter, hidden),
            "up_proj": (inter, hidden),
            "down_proj": (hidden, inter),
        }
        if name_or_path is None:
            name_or_path = getattr(config, "_name_or_path", "") or ""
        return cls(int(config.num_hidden_layers), hidden, shapes, name_or_path)


@dataclass
class LoraAdapter:
    """A LoRA adapter in host memory, ready to copy into an engine slot.

    ``weights[(layer, proj)] = (A [r, in_features], B [out_features, r])`` with B already
    multiplied by the module's scale (recorded in ``scales``), so the update is ``x @ A.T @ B.T``.
    """

    name: str
    path: str
    config: dict
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scales: dict[tuple[int, str], float]

    @property
    def ranks(self) -> dict[str, int]:
        """Per projection, the largest rank over layers (projections not adapted are absent)."""
        out: dict[str, int] = {}
        for (_, proj), (a, _) in self.weights.items():
            out[proj] = max(out.get(proj, 0), int(a.shape[0]))
        return {p: out[p] for p in PROJECTIONS if p in out}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


@dataclass
class SoftPrompt:
    """A prompt-tuning adapter: virtual-token embeddings placed in front of the prompt."""

    name: str
    path: str
    config: dict
    embeddings: torch.Tensor

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return self.embeddings.nbytes


# --------------------------------------------------------------------------------------------
# Weights file
# --------------------------------------------------------------------------------------------


def _weights_path(directory: Path, where: str) -> Path:
    """The adapter's safetensors weights file; a directory holding only pickled weights is refused."""
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(
            f"{where}: only pickled weights found ({', '.join(pickled)}); pickled weights are refused and never "
            f"unpickled. Convert them to {WEIGHTS_NAME} in a trusted environment (e.g. load with PEFT and "
            "save_pretrained(..., safe_serialization=True)) and register that"
        )
    raise AdapterError(f"{where}: {WEIGHTS_NAME} is missing")


# --------------------------------------------------------------------------------------------
# LoRA tensor names and shapes
# --------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]\w*)\.(?P<proj>[A-Za-z_]\w*)"
    r"\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)


@dataclass
class _ModulePlan:
    key_a: str
    key_b: str
    rank: int
    scale: float


def _module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{_BLOCK_OF[proj]}.{proj}"


def _refuse_key(key: str, where: str) -> AdapterError:
    """The most helpful error for a tensor name that is not a supported LoRA weight."""
    lowered = key.lower()
    if "lora_magnitude_vector" in lowered:
        return AdapterError(f"{where}: tensor {key!r} is a DoRA magnitude vector; DoRA is not implemented")
    if "lm_head" in lowered:
        return AdapterError(f"{where}: tensor {key!r} targets lm_head, which loraplex does not adapt")
    if "embed_tokens" in lowered or "lora_embedding" in lowered:
        return AdapterError(f"{where}: tensor {key!r} targets embed_tokens, which loraplex does not adapt")
    if ".bias" in lowered and "lora_" in lowered:
        return AdapterError(f"{where}: tensor {key!r} is a LoRA bias, which loraplex does not implement")
    return AdapterError(
        f"{where}: unexpected tensor {key!r}; loraplex serves LoRA on model.layers.N.(self_attn|mlp).PROJ "
        f"with PROJ one of {', '.join(PROJECTIONS)}"
    )


def _group_lora_keys(
    tensors: dict[str, TensorInfo], base: BaseModelShape, where: str
) -> dict[tuple[int, str], dict[str, str]]:
    """Map each tensor name onto (layer, proj) -> {"A": name, "B": name}, refusing anything else."""
    modules: dict[tuple[int, str], dict[str, str]] = {}
    for key in sorted(tensors):
        match = _LORA_KEY.match(key)
        if match is None:
            raise _refuse_key(key, where)
        layer, block, proj = int(match["layer"]), match["block"], match["proj"]
        if proj not in PROJECTIONS:
            raise AdapterError(
                f"{where}: tensor {key!r} targets {proj}, which is not one of the projections loraplex adapts "
                f"({', '.join(PROJECTIONS)})"
            )
        if block != _BLOCK_OF[proj]:
            raise AdapterError(f"{where}: tensor {key!r}: {proj} belongs under {_BLOCK_OF[proj]}, not {block}")
        if layer >= base.num_layers:
            raise AdapterError(
                f"{where}: tensor {key!r} targets layer {layer}, but the base model has {base.num_layers} layers"
            )
        slot = modules.setdefault((layer, proj), {})
        if match["ab"] in slot:
            raise AdapterError(
                f"{where}: {_module_name(layer, proj)} has two lora_{match['ab']} tensors "
                f"({slot[match['ab']]!r} and {key!r})"
            )
        slot[match["ab"]] = key
    for (layer, proj), slot in modules.items():
        for have, need in (("A", "B"), ("B", "A")):
            if have in slot and need not in slot:
                raise AdapterError(
                    f"{where}: {_module_name(layer, proj)} has lora_{have} ({slot[have]!r}) but no lora_{need}"
                )
    return modules


def _plan_module(
    layer: int, proj: str, info_a: TensorInfo, info_b: TensorInfo, config: dict, base: BaseModelShape,
    max_rank: int, where: str,
) -> int:
    """Check one module's A/B shapes against the base layer and the server's limit; return the rank."""
    module = _module_name(layer, proj)
    out_features, in_features = base.projection_shapes[proj]
    if len(info_a.shape) != 2 or len(info_b.shape) != 2:
        raise AdapterError(
            f"{where}: {module}: lora_A {list(info_a.shape)} and lora_B {list(info_b.shape)} must both be 2-D"
        )
    rank = info_a.shape[0]
    if info_b.shape[1] != rank:
        raise AdapterError(
            f"{where}: {module}: lora_A has shape {list(info_a.shape)} (rank {rank}) but lora_B has shape "
            f"{list(info_b.shape)} (rank {info_b.shape[1]}); the ranks must agree"
        )
    if info_a.shape[1] != in_features:
        raise AdapterError(
            f"{where}: {module}: lora_A has shape {list(info_a.shape)} but the base layer needs "
            f"[{rank}, {in_features}] (in_features {in_features})"
        )
    if info_b.shape[0] != out_features:
        raise AdapterError(
            f"{where}: {module}: lora_B has shape {list(info_b.shape)} but the base layer needs "
            f"[{out_features}, {rank}] (out_features {out_features})"
        )
    if rank < 1:
        raise AdapterError(f"{where}: {module}: rank 0 (empty lora_A {list(info_a.shape)})")
    if rank > max_rank:
        raise AdapterError(f"{where}: {module}: rank {rank} exceeds the server's --max-lora-rank {max_rank}")
    declared = pattern_value(config.get("rank_pattern") or {}, module, lora_r(config))
    if declared != rank:
        # PEFT itself would refuse this adapter (size mismatch), and its scale would use `declared`.
        raise AdapterError(
            f"{where}: {module}: tensors have rank {rank} but {CONFIG_NAME} declares r = {declared} "
            "(r / rank_pattern) for this module"
        )
    return rank


def _plan_lora(
    tensors: dict[str, TensorInfo], config: dict, base: BaseModelShape, max_rank: int, where: str
) -> dict[tuple[int, str], _ModulePlan]:
    if not tensors:
        raise AdapterError(f"{where}: {WEIGHTS_NAME} holds no tensors")
    grouped = _group_lora_keys(tensors, base, where)
    plans: dict[tuple[int, str], _ModulePlan] = {}
    for layer, proj in sorted(grouped, key=lambda lp: (lp[0], PROJECTIONS.index(lp[1]))):
        keys = grouped[(layer, proj)]
        rank = _plan_module(layer, proj, tensors[keys["A"]], tensors[keys["B"]], config, base, max_rank, where)
        scale = lora_scale(config, _module_name(layer, proj), rank)
        plans[(layer, proj)] = _ModulePlan(keys["A"], keys["B"], rank, float(scale))
    return plans


def _plan_soft_prompt(
    tensors: dict[str, TensorInfo], num_virtual_tokens: int, base: BaseModelShape, where: str
) -> str:
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{where}: {WEIGHTS_NAME} has no prompt_embeddings tensor")
    extra = sorted(k for k in tensors if k != "prompt_embeddings")
    if extra:
        raise AdapterError(
            f"{where}: unexpected tensor {extra[0]!r}; a soft prompt holds only prompt_embeddings"
        )
    shape = list(tensors["prompt_embeddings"].shape)
    needed = [num_virtual_tokens, base.hidden_size]
    if shape != needed:
        raise AdapterError(
            f"{where}: prompt_embeddings has shape {shape} but the base model needs {needed} "
            f"(num_virtual_tokens {num_virtual_tokens}, hidden_size {base.hidden_size})"
        )
    return "prompt_embeddings"


# --------------------------------------------------------------------------------------------
# Validation, inspection and loading
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything validation learned; loading only has to read the named tensors."""

    path: str
    kind: str
    config: dict
    weights: Path
    tensors: dict[str, TensorInfo]
    lora: dict[tuple[int, str], _ModulePlan] = field(default_factory=dict)
    num_virtual_tokens: int = 0
    warnings: list[str] = field(default_factory=list)


def _validate(path: PathLike, base: BaseModelShape, max_rank: int, max_bytes: int) -> _Plan:
    where = f"adapter {os.fspath(path)}"
    config = read_adapter_config(path)
    try:
        kind = adapter_kind(config)
    except AdapterError as exc:
        raise AdapterError(f"{where}: {exc}") from None
    weights = _weights_path(Path(path), where)
    if kind == "lora":
        check_lora_config(config, where)
    else:
        num_virtual_tokens = check_prompt_config(config, where)
    tensors = read_header(weights, where, max_bytes)
    plan = _Plan(os.fspath(path), kind, config, weights, tensors)
    if kind == "lora":
        plan.lora = _plan_lora(tensors, config, base, max_rank, where)
    else:
        _plan_soft_prompt(tensors, num_virtual_tokens, base, where)
        plan.num_virtual_tokens = num_virtual_tokens
    plan.warnings = base_model_warnings(config, base.name_or_path)
    return plan


def inspect_adapter(
    path: PathLike,
    base: BaseModelShape,
    max_rank: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Validate an adapter from its config and safetensors header alone; no tensor is read.

    Returns ``{"kind", "ranks" (lora), "max_rank" (lora), "num_virtual_tokens" (soft prompt),
    "nbytes", "warnings"}``; ``nbytes`` is the host memory :func:`load_adapter` would use at
    ``dtype``. Warnings are only returned here (``load_adapter`` logs them).
    """
    plan = _validate(path, base, max_rank, max_bytes)
    itemsize = _itemsize(dtype)
    numel = sum(plan.tensors[k].numel for k in _needed_keys(plan))
    summary: dict[str, Any] = {"kind": plan.kind, "nbytes": numel * itemsize, "warnings": list(plan.warnings)}
    if plan.kind == "lora":
        ranks: dict[str, int] = {}
        for (_, proj), module in plan.lora.items():
            ranks[proj] = max(ranks.get(proj, 0), module.rank)
        summary["ranks"] = {p: ranks[p] for p in PROJECTIONS if p in ranks}
        summary["max_rank"] = max(ranks.values())
    else:
        summary["num_virtual_tokens"] = plan.num_virtual_tokens
    return summary


def load_adapter(
    path: PathLike,
    name: str,
    base: BaseModelShape,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    pace: Pace = nullcontext,
) -> LoraAdapter | SoftPrompt:
    """Validate (as :func:`inspect_adapter`), then read the tensors into host memory at ``dtype``.

    For LoRA, each B comes back multiplied by its module's PEFT scale. A base-model name mismatch
    is logged once for ``name`` at ``path`` (:func:`report_base_model`). The heavy work (reading,
    scaling) runs in pieces of about `READ_SLICE_BYTES`, each inside `with pace():` (see `interleave`).
    """
    _itemsize(dtype)
    plan = _validate(path, base, max_rank, max_bytes)
    report_base_model(name, plan.path, plan.warnings)
    where = f"adapter {plan.path}"
    tensors = _read_tensors(plan.weights, _needed_keys(plan), plan.tensors, where, pace)
    if plan.kind == "soft_prompt":
        embeddings = tensors["prompt_embeddings"].to(dtype).contiguous()
        return SoftPrompt(name=name, path=plan.path, config=plan.config, embeddings=embeddings)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for group in slices_of(list(plan.lora.items()), lambda item: _span(plan.tensors[item[1].key_b])):
        with pace():
            for module_key, module in group:
                a, b = tensors[module.key_a], tensors[module.key_b]
                weights[module_key] = (a.to(dtype).contiguous(), _scaled(b, module.scale, dtype))
                scales[module_key] = module.scale
    return LoraAdapter(name=name, path=plan.path, config=plan.config, weights=weights, scales=scales)


_reported: set[tuple[str, str]] = set()  # (name, path) of each adapter whose notes were logged
_reported_lock = threading.Lock()  # loads run on the reader thread, registrations on the engine's


def report_base_model(name: str, path: PathLike, notes: list[str]) -> None:
    """Log an adapter's base-model notes (``inspect_adapter``'s "warnings"), one line each, the
    first time they are reported for adapter ``name`` at ``path`` in this process: one adapter
    version is loaded again after every eviction, and the server both registers and loads it,
    but an operator needs to read it once ("adapter sql@2 was trained on SmolLM2-360M; serving
    SmolLM2-135M-Instruct")."""
    key = (name, os.fspath(path))
    with _reported_lock:
        if not notes or key in _reported:
            return
        _reported.add(key)
    for note in notes:
        log.warning("adapter %s was %s", name, note)


def _scaled(b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``b * scale`` computed in at least float32 (as PEFT does for float32 weights), then cast.
    `b` is this load's own copy of the file's tensor: where no cast is needed it is scaled in
    place (no second buffer, and no page faults for one)."""
    compute = torch.float64 if b.dtype == torch.float64 else torch.float32
    if b.dtype == compute == dtype:
        return b.mul_(scale)
    return (b.to(compute) * scale).to(dtype).contiguous()


def _needed_keys(plan: _Plan) -> list[str]:
    if plan.kind == "soft_prompt":
        return ["prompt_embeddings"]
    return [k for module in plan.lora.values() for k in (module.key_a, module.key_b)]


def _read_tensors(
    weights: Path, keys: list[str], infos: dict[str, TensorInfo], where: str, pace: Pace = nullcontext
) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a vetted safetensors file, as views of one buffer holding the file.

    The file is read straight into memory torch owns (the read releases the GIL, and nothing is
    copied a second time), so this holds the GIL only for a few short Python steps. That matters
    because it runs on the reader thread beside the engine's: `safetensors.torch.load(bytes)` held
    the GIL for 7-25 ms per rank-64 adapter, stopping the engine thread as long. Each copy into
    fresh memory also costs a page fault per 4 KiB. (`safe_open(...).get_tensor` also keeps two
    small objects per call for good in safetensors 0.8.)"""
    try:
        size = weights.stat().st_size
        data = torch.empty(size, dtype=torch.uint8)
        buffer = _memory_of(data)
        got = _read_into(weights, buffer, pace)
        (header_len,) = struct.unpack_from("<Q", buffer, 0)
        header = json.loads(bytes(buffer[8 : 8 + header_len]))
    except (OSError, ValueError, struct.error) as exc:  # vetted already: I/O, or changed underneath
        raise AdapterError(f"{where}: cannot read {weights.name}: {exc}") from None
    if got != size:
        raise AdapterError(f"{where}: {weights.name} changed on disk while loading; try again")
    start = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        info, entry = infos[key], header.get(key)
        if (not isinstance(entry, dict) or entry.get("dtype") != info.dtype
                or tuple(entry.get("shape", ())) != info.shape or entry.get("data_offsets") != [info.begin, info.end]
                or start + info.end > size):
            raise AdapterError(f"{where}: {key!r} changed on disk while loading; try again")
        dtype = FLOAT_DTYPES[info.dtype]
        raw = data[start + info.begin : start + info.end]
        if (start + info.begin) % FLOAT_ITEMSIZE[info.dtype]:
            raw = raw.clone()  # a misaligned span cannot be viewed as its dtype
        out[key] = raw.view(dtype).view(info.shape)
    return out


_memoryview_of = ctypes.pythonapi.PyMemoryView_FromMemory
_memoryview_of.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memoryview_of.restype = ctypes.py_object
_PYBUF_WRITE = 0x200


def _memory_of(data: torch.Tensor) -> memoryview:
    """A writable byte view of the uint8 CPU tensor `data` [n] (its own memory, not a copy). Not a
    ctypes array: ctypes keeps one array type per length for good, a leak across file sizes."""
    return _memoryview_of(data.data_ptr(), data.numel(), _PYBUF_WRITE)


def _read_into(path: Path, buffer: memoryview, pace: Pace = nullcontext) -> int:
    """Fill `buffer` from the file, `READ_SLICE_BYTES` per `pace()`; returns the bytes read (fewer
    if the file shrank)."""
    got = 0
    with open(path, "rb", buffering=0) as fh:
        while got < len(buffer):
            with pace():
                n = fh.readinto(buffer[got : got + READ_SLICE_BYTES])
            if not n:
                break
            got += n
    return got


def _span(info: TensorInfo) -> int:
    return info.end - info.begin


def slices_of(items: list, nbytes: Callable[[Any], int]) -> list[list]:
    """`items` in order, cut into runs of about `READ_SLICE_BYTES` (by `nbytes` of each)."""
    out: list[list] = [[]]
    size = 0
    for item in items:
        if out[-1] and size + nbytes(item) > READ_SLICE_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += nbytes(item)
    return out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()
