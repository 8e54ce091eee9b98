"""Read PEFT adapters from disk, validated against the served base model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as written by
Hugging Face PEFT's ``save_pretrained``. Two kinds are served:

* LoRA (``peft_type`` "LORA") on the seven Llama-family projections, and
* soft prompts (``peft_type`` "PROMPT_TUNING"), one ``prompt_embeddings`` tensor.

Everything that can be checked is checked from the config and the safetensors *header* before a
single tensor is read, so a registry can vet an upload cheaply (:func:`inspect_adapter`) and the
engine never half-loads a bad adapter (:func:`load_adapter` runs the same checks first). Every
refusal is an :class:`AdapterError` naming the adapter path and the offending thing.

The work is split four ways: :mod:`.peft_config` reads the config and applies the PEFT config
rules, :mod:`.adapter_format` names the projections, their blocks and keys and the base model's
shapes, :mod:`.safetensors_file` checks the weights file's header and reads its tensors, and this
module matches the tensors against the base model and plans each module.
:func:`read_adapter_config` and :func:`adapter_kind` are re-exported from here.

Pickled weights (``.bin``, ``.pt``, ...) are refused and never unpickled: nothing here calls
``torch.load``, ``pickle`` or PEFT's own loaders.

Options the engine does not implement are refused by name rather than ignored, and so is any
config key loraplex does not know whose value is set: a future PEFT feature that changes the
maths must fail loudly, not serve subtly wrong outputs.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .adapter_errors import AdapterError, short
from .adapter_format import BLOCK_OF, LORA_KEY, PROJECTIONS, BaseModelShape, module_name
from .module_regex import compile_regex, matching, pattern_key_regex
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
    report_base_model,
)
from .safetensors_file import Pace, TensorInfo, read_header, read_tensors, slices_of

__all__ = [
    "LoraAdapter",
    "SoftPrompt",
    "read_adapter_config",
    "adapter_kind",
    "inspect_adapter",
    "load_adapter",
]

DEFAULT_MAX_BYTES = 4 * 1024**3

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


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

@dataclass
class _ModulePlan:
    key_a: str
    key_b: str
    rank: int
    scale: float


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
        match = LORA_KEY.match(key)
        if match is None:
            raise _refuse_key(key, where)
        layer, block, proj = int(match["layer"]), match["block"], match["proj"]
        if proj not in PROJECTIONS:
            raise AdapterError(
                f"{where}: tensor {key!r} targets {proj}, which is not one of the projections loraplex adapts "
                f"({', '.join(PROJECTIONS)})"
            )
        if block != BLOCK_OF[proj]:
            raise AdapterError(f"{where}: tensor {key!r}: {proj} belongs under {BLOCK_OF[proj]}, not {block}")
        if layer >= base.num_layers:
            raise AdapterError(
                f"{where}: tensor {key!r} targets layer {layer}, but the base model has {base.num_layers} layers"
            )
        pair = modules.setdefault((layer, proj), {})
        if match["ab"] in pair:
            raise AdapterError(
                f"{where}: {module_name(layer, proj)} has two lora_{match['ab']} tensors "
                f"({pair[match['ab']]!r} and {key!r})"
            )
        pair[match["ab"]] = key
    for (layer, proj), pair in modules.items():
        for have, need in (("A", "B"), ("B", "A")):
            if have in pair and need not in pair:
                raise AdapterError(
                    f"{where}: {module_name(layer, proj)} has lora_{have} ({pair[have]!r}) but no lora_{need}"
                )
    return modules


def _plan_module(
    layer: int, proj: str, info_a: TensorInfo, info_b: TensorInfo, config: dict, base: BaseModelShape,
    max_rank: int, where: str,
) -> int:
    """Check one module's A/B shapes against the base layer and the server's limit; return the rank."""
    module = module_name(layer, proj)
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
        scale = lora_scale(config, module_name(layer, proj), rank)
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


def _model_modules(base: BaseModelShape) -> list[str]:
    return [module_name(layer, proj) for layer in range(base.num_layers) for proj in PROJECTIONS]


def _check_patterns(config: dict, base: BaseModelShape, where: str) -> None:
    """Match each ``rank_pattern`` / ``alpha_pattern`` key against every module name once, within
    a time bound, before :func:`pattern_value` applies them module by module."""
    modules = _model_modules(base)
    for key in ("rank_pattern", "alpha_pattern"):
        for k in config.get(key) or {}:
            what = f"{CONFIG_NAME} {key} key {short(k, 60)}"
            matching(pattern_key_regex(k, what, where), modules, False, what, where)


def _check_target_modules(config: dict, base: BaseModelShape, where: str) -> None:
    """Refuse a ``target_modules`` naming something the served model does not have.

    PEFT's matching rule (``check_target_module_exists``): a string is a regex that must match a
    module's whole name; a list entry matches a module whose name equals it or ends with
    ``"." + entry``. An entry that matches no projection of the served model (a typo, a module of
    another architecture) was accepted silently before; it means the adapter was not trained for
    this model as the operator thinks, so it is refused by name. ``"all-linear"`` is PEFT's
    shorthand for every linear layer but the output layer.
    """
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    modules = _model_modules(base)
    if isinstance(targets, str):
        what = f"{CONFIG_NAME} target_modules"
        if not any(matching(compile_regex(targets, what, where), modules, True, what, where)):
            raise AdapterError(f"{where}: {CONFIG_NAME} target_modules {short(targets)} matches no projection of "
                               f"the served model (model.layers.N.(self_attn|mlp).PROJ, PROJ one of "
                               f"{', '.join(PROJECTIONS)})")
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{where}: {CONFIG_NAME} target_modules must be a string or a list of strings, "
                           f"found {short(targets)}")
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unmatched:
        shown = ", ".join(short(t, 60) for t in unmatched[:5])
        if len(unmatched) > 5:
            shown += f" and {len(unmatched) - 5} more"
        raise AdapterError(f"{where}: {CONFIG_NAME} target_modules names {shown}, matching no projection of the "
                           f"served model; loraplex adapts {', '.join(PROJECTIONS)} in each of its {base.num_layers} "
                           "layers")


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
        _check_patterns(config, base, where)
        plan.lora = _plan_lora(tensors, config, base, max_rank, where)
        _check_target_modules(config, base, where)
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
    scaling) runs in pieces of about `safetensors_file.READ_SLICE_BYTES`, each inside `with pace():`
    (see `interleave`).
    """
    _itemsize(dtype)
    plan = _validate(path, base, max_rank, max_bytes)
    report_base_model(name, plan.path, plan.warnings)
    where = f"adapter {plan.path}"
    tensors = read_tensors(plan.weights, _needed_keys(plan), plan.tensors, where, pace)
    if plan.kind == "soft_prompt":
        embeddings = tensors["prompt_embeddings"].to(dtype).contiguous()
        return SoftPrompt(name=name, path=plan.path, config=plan.config, embeddings=embeddings)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for group in slices_of(list(plan.lora.items()), lambda item: plan.tensors[item[1].key_b].nbytes):
        with pace():
            for module_key, module in group:
                a, b = tensors[module.key_a], tensors[module.key_b]
                weights[module_key] = (a.to(dtype).contiguous(), _scaled(b, module.scale, dtype))
                scales[module_key] = module.scale
    return LoraAdapter(name=name, path=plan.path, config=plan.config, weights=weights, scales=scales)


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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()
