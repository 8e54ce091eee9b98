"""Read PEFT adapters from disk, validated against the served base model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as written by
Hugging Face PEFT's ``save_pretrained``. Two kinds are served:

* LoRA (``peft_type`` "LORA") on the seven Llama-family projections, and
* soft prompts (``peft_type`` "PROMPT_TUNING"), one ``prompt_embeddings`` tensor.

Everything that can be checked is checked from the config and the safetensors *header* before a
single tensor is read, so a registry can vet an upload cheaply (:func:`inspect_adapter`) and the
engine never half-loads a bad adapter (:func:`load_adapter` runs the same checks first). Every
refusal is an :class:`AdapterError` naming the adapter path and the offending thing.

Pickled weights (``.bin``, ``.pt``, ...) are refused and never unpickled: nothing here calls
``torch.load``, ``pickle`` or PEFT's own loaders.

Options the engine does not implement are refused by name rather than ignored, and so is any
config key this module does not know whose value is set: a future PEFT feature that changes the
maths must fail loudly, not serve subtly wrong outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch

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
]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_MAX_BYTES = 4 * 1024**3

# safetensors' own loader refuses headers above this size; never be looser than the loader.
_MAX_HEADER_BYTES = 100_000_000
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_FLOAT_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
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


class AdapterError(ValueError):
    """A clear, user-actionable message; never a traceback from deep inside."""


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
            if len(shape) != 2 or not all(_is_int(d) and d > 0 for d in shape):
                raise ValueError(f"BaseModelShape.projection_shapes[{proj!r}] = {shape!r} is not (out, in)")
        if not (_is_int(self.num_layers) and self.num_layers > 0):
            raise ValueError(f"BaseModelShape.num_layers must be a positive int, got {self.num_layers!r}")
        if not (_is_int(self.hidden_size) and self.hidden_size > 0):
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
# Config
# --------------------------------------------------------------------------------------------


def read_adapter_config(path: PathLike) -> dict:
    """Parse ``<path>/adapter_config.json``; ``path`` must be the adapter directory."""
    directory = Path(path)
    if not directory.exists():
        raise AdapterError(f"adapter {path}: no such directory")
    if not directory.is_dir():
        raise AdapterError(
            f"adapter {path}: not a directory; pass the adapter directory holding {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}"
        )
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"adapter {path}: {CONFIG_NAME} is missing; is this a PEFT adapter directory?")
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter {path}: {CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(
            f"adapter {path}: {CONFIG_NAME} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise AdapterError(f"adapter {path}: cannot read {CONFIG_NAME}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"adapter {path}: {CONFIG_NAME} must hold a JSON object, found {type(config).__name__}"
        )
    return config


def adapter_kind(config: dict) -> str:
    """``"lora"`` or ``"soft_prompt"`` from the config's ``peft_type``; anything else is refused."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{CONFIG_NAME} has no peft_type; expected LORA or PROMPT_TUNING")
    if not isinstance(peft_type, str):
        raise AdapterError(f"{CONFIG_NAME} peft_type must be a string, found {peft_type!r}")
    normalized = peft_type.upper()
    if normalized == "LORA":
        return "lora"
    if normalized == "PROMPT_TUNING":
        return "soft_prompt"
    if normalized in _OTHER_PROMPT_LEARNING:
        raise AdapterError(
            f"peft_type {peft_type} is not supported: the only prompt-learning method loraplex serves "
            "is PROMPT_TUNING (soft prompts)"
        )
    raise AdapterError(f"peft_type {peft_type} is not supported: loraplex serves LORA and PROMPT_TUNING adapters")


_OTHER_PROMPT_LEARNING = frozenset(
    {"PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}
)

# LoraConfig keys (peft/tuners/lora/config.py and PeftConfig) that never change what a saved
# adapter computes at inference: bookkeeping, training-time options, and options whose effect is
# already baked into the saved tensors or is honoured below (rank_pattern, alpha_pattern,
# use_rslora, layers_to_transform). megatron_core and qalora_group_size are only read when
# megatron_config / use_qalora are set, which are refused.
_LORA_HARMLESS_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "lora_dropout",
        "init_lora_weights",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "loftq_config",
        "eva_config",
        "corda_config",
        "runtime_config",
        "ensure_weight_tying",
        "megatron_core",
        "qalora_group_size",
    }
)

# Options that change the computation and that the engine does not implement. Each maps to a test
# "is this value set?" and a short description for the error message.
_LORA_REFUSED_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_dora": (lambda v: bool(v), "DoRA (weight-decomposed LoRA)"),
    "modules_to_save": (lambda v: bool(v), "fully trained extra modules"),
    "bias": (lambda v: v not in (None, "none"), "trained bias terms"),
    "lora_bias": (lambda v: bool(v), "a bias on lora_B"),
    "fan_in_fan_out": (lambda v: bool(v), "transposed (Conv1D-style) weights"),
    "layer_replication": (lambda v: bool(v), "layer replication"),
    "trainable_token_indices": (lambda v: bool(v), "trainable token embeddings"),
    "alora_invocation_tokens": (lambda v: v is not None, "activated LoRA (aLoRA)"),
    "use_qalora": (lambda v: bool(v), "QA-LoRA"),
    "target_parameters": (lambda v: bool(v), "LoRA on raw parameters"),
    "megatron_config": (lambda v: v is not None, "Megatron parallel layers"),
}

# init_lora_weights values that only affect training. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA also
# rewrite the base weights, so an adapter saved with them needs that modified base model.
_HARMLESS_INITS = ("gaussian", "eva", "orthogonal", "mica")
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_PROMPT_HARMLESS_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "modules_to_save",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    }
)


def _check_task_type(config: dict, where: str) -> None:
    task_type = config.get("task_type")
    if task_type is not None and task_type != "CAUSAL_LM":
        raise AdapterError(
            f"{where}: task_type {task_type!r} is not supported; loraplex serves CAUSAL_LM adapters"
        )


def _check_unknown_keys(config: dict, known: frozenset[str], where: str) -> None:
    for key in sorted(config):
        if key not in known and config[key]:
            raise AdapterError(
                f"{where}: {CONFIG_NAME} sets {key!r} = {_short(config[key])}, an option loraplex does not "
                "recognise; refusing rather than ignoring it (it may change what the adapter computes)"
            )


def _check_lora_config(config: dict, where: str) -> None:
    _check_task_type(config, where)
    for key, (is_set, what) in _LORA_REFUSED_OPTIONS.items():
        if key in config and is_set(config[key]):
            raise AdapterError(
                f"{where}: {CONFIG_NAME} sets {key} = {_short(config[key])} ({what}), which loraplex does not implement"
            )
    _check_init(config.get("init_lora_weights", True), where)
    known = _LORA_HARMLESS_KEYS | frozenset(_LORA_REFUSED_OPTIONS)
    _check_unknown_keys(config, known, where)

    r, alpha = _lora_r(config), _lora_alpha(config)
    if not (_is_int(r) and r > 0):
        raise AdapterError(f"{where}: {CONFIG_NAME} r must be a positive integer, found {r!r}")
    if not _is_finite_number(alpha):
        raise AdapterError(f"{where}: {CONFIG_NAME} lora_alpha must be a finite number, found {alpha!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{where}: {CONFIG_NAME} use_rslora must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{where}: {CONFIG_NAME} {key} must be an object, found {_short(pattern)}")
        for k, v in pattern.items():
            ok = _is_int(v) and v > 0 if key == "rank_pattern" else _is_finite_number(v)
            if not ok:
                raise AdapterError(f"{where}: {CONFIG_NAME} {key}[{k!r}] = {v!r} is not a valid value")
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as exc:
                raise AdapterError(f"{where}: {CONFIG_NAME} {key} key {k!r} is not a valid regex: {exc}") from None


def _lora_r(config: dict) -> Any:
    """``r`` as PEFT reads it: LoraConfig's default (8) when the key is absent."""
    return config.get("r", 8)


def _lora_alpha(config: dict) -> Any:
    return config.get("lora_alpha", 8)


def _check_init(init: Any, where: str) -> None:
    if init is None or isinstance(init, bool):
        return
    if isinstance(init, str):
        lowered = init.lower()
        if lowered in _HARMLESS_INITS:
            return
        if lowered.startswith(_BASE_REWRITING_INITS):
            raise AdapterError(
                f"{where}: {CONFIG_NAME} has init_lora_weights = {init!r}; such an adapter only works on a base "
                "model whose weights that initialisation rewrote. Save it as a plain LoRA with PEFT's "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) and register that"
            )
    raise AdapterError(
        f"{where}: {CONFIG_NAME} has init_lora_weights = {_short(init)}, which loraplex does not recognise"
    )


def _check_prompt_config(config: dict, where: str) -> int:
    """Validate a PROMPT_TUNING config; return its num_virtual_tokens."""
    _check_task_type(config, where)
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: {CONFIG_NAME} sets modules_to_save = {_short(config['modules_to_save'])}, "
            "which loraplex does not implement"
        )
    _check_unknown_keys(config, _PROMPT_HARMLESS_KEYS, where)
    tokens = config.get("num_virtual_tokens")
    if not (_is_int(tokens) and tokens > 0):
        raise AdapterError(f"{where}: {CONFIG_NAME} num_virtual_tokens must be a positive integer, found {tokens!r}")
    submodules = config.get("num_transformer_submodules")
    if submodules is not None and submodules != 1:
        raise AdapterError(
            f"{where}: {CONFIG_NAME} num_transformer_submodules = {submodules!r}; only 1 (decoder-only) is supported"
        )
    # token_dim is not checked here: the prompt_embeddings shape check says more (both shapes).
    return tokens


def _base_model_warnings(config: dict, base: BaseModelShape, where: str) -> list[str]:
    theirs, ours = _model_basename(config.get("base_model_name_or_path")), _model_basename(base.name_or_path)
    if not theirs or not ours or theirs == ours:
        return []
    return [
        f"{where}: adapter was trained on base model {config.get('base_model_name_or_path')!r}, "
        f"but the server runs {base.name_or_path!r}; loading it anyway since the shapes fit"
    ]


def _model_basename(name: Any) -> str:
    if not isinstance(name, str):
        return ""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].strip().lower()


# --------------------------------------------------------------------------------------------
# Weights file and safetensors header
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _weights_path(directory: Path, where: str) -> Path:
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


def _read_header(weights: Path, where: str, max_bytes: int) -> dict[str, _TensorInfo]:
    """Parse and check the safetensors header by hand, reading no tensor data."""
    name = weights.name
    try:
        file_size = weights.stat().st_size
        with open(weights, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise AdapterError(f"{where}: {name} is {file_size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise AdapterError(
                    f"{where}: {name} claims a {header_len}-byte header (limit {_MAX_HEADER_BYTES}); "
                    "the file is corrupt or not safetensors"
                )
            if 8 + header_len > file_size:
                raise AdapterError(
                    f"{where}: {name} claims a {header_len}-byte header but the file is only {file_size} bytes; "
                    "the file is corrupt or truncated"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise AdapterError(f"{where}: cannot read {name}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{where}: {name} has a corrupt header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: {name} has a corrupt header (not a JSON object)")

    tensors: dict[str, _TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise AdapterError(f"{where}: {name} has a corrupt header (__metadata__ is not an object)")
            continue
        tensors[key] = _parse_entry(key, entry, f"{where}: {name}")

    _check_layout(tensors, f"{where}: {name}", file_size - 8 - header_len, max_bytes)
    return tensors


def _parse_entry(key: str, entry: Any, where: str) -> _TensorInfo:
    if not isinstance(entry, dict):
        raise AdapterError(f"{where}: header entry for tensor {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _FLOAT_ITEMSIZE:
        raise AdapterError(
            f"{where}: tensor {key!r} has dtype {dtype!r}; adapter weights must be floating point "
            f"({', '.join(_FLOAT_ITEMSIZE)})"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise AdapterError(f"{where}: tensor {key!r} has an invalid shape {_short(shape)}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
    ) or offsets[1] < offsets[0]:
        raise AdapterError(f"{where}: tensor {key!r} has invalid data_offsets {_short(offsets)}")
    info = _TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * _FLOAT_ITEMSIZE[dtype]
    if info.end - info.begin != expected:
        raise AdapterError(
            f"{where}: tensor {key!r} ({dtype} {list(shape)}) needs {expected} bytes but its data_offsets "
            f"span {info.end - info.begin}"
        )
    return info


def _check_layout(tensors: dict[str, _TensorInfo], where: str, data_size: int, max_bytes: int) -> None:
    total = sum(t.end - t.begin for t in tensors.values())
    if total > max_bytes:
        raise AdapterError(f"{where}: tensors total {total} bytes, over the limit of {max_bytes} bytes")
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    for (prev_key, prev), (key, cur) in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise AdapterError(f"{where}: tensors {prev_key!r} and {key!r} overlap; the header is corrupt")
    promised = max((t.end for t in tensors.values()), default=0)
    if promised > data_size:
        raise AdapterError(
            f"{where}: truncated: header promises {promised} bytes of tensor data, file has {data_size}"
        )


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
    tensors: dict[str, _TensorInfo], base: BaseModelShape, where: str
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


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first key k with ``(.*\\.)?(k)$`` matching wins."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return pattern.get(module, default)


def _plan_module(
    layer: int, proj: str, info_a: _TensorInfo, info_b: _TensorInfo, config: dict, base: BaseModelShape,
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
    declared = _pattern_value(config.get("rank_pattern") or {}, module, _lora_r(config))
    if declared != rank:
        # PEFT itself would refuse this adapter (size mismatch), and its scale would use `declared`.
        raise AdapterError(
            f"{where}: {module}: tensors have rank {rank} but {CONFIG_NAME} declares r = {declared} "
            "(r / rank_pattern) for this module"
        )
    return rank


def _lora_scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, _lora_alpha(config))
    if config.get("use_rslora", False):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _plan_lora(
    tensors: dict[str, _TensorInfo], config: dict, base: BaseModelShape, max_rank: int, where: str
) -> dict[tuple[int, str], _ModulePlan]:
    if not tensors:
        raise AdapterError(f"{where}: {WEIGHTS_NAME} holds no tensors")
    grouped = _group_lora_keys(tensors, base, where)
    plans: dict[tuple[int, str], _ModulePlan] = {}
    for layer, proj in sorted(grouped, key=lambda lp: (lp[0], PROJECTIONS.index(lp[1]))):
        keys = grouped[(layer, proj)]
        rank = _plan_module(layer, proj, tensors[keys["A"]], tensors[keys["B"]], config, base, max_rank, where)
        scale = _lora_scale(config, _module_name(layer, proj), rank)
        plans[(layer, proj)] = _ModulePlan(keys["A"], keys["B"], rank, float(scale))
    return plans


def _plan_soft_prompt(
    tensors: dict[str, _TensorInfo], num_virtual_tokens: int, base: BaseModelShape, where: str
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
    tensors: dict[str, _TensorInfo]
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
        _check_lora_config(config, where)
    else:
        num_virtual_tokens = _check_prompt_config(config, where)
    tensors = _read_header(weights, where, max_bytes)
    plan = _Plan(os.fspath(path), kind, config, weights, tensors)
    if kind == "lora":
        plan.lora = _plan_lora(tensors, config, base, max_rank, where)
    else:
        _plan_soft_prompt(tensors, num_virtual_tokens, base, where)
        plan.num_virtual_tokens = num_virtual_tokens
    plan.warnings = _base_model_warnings(config, base, where)
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
    ``dtype``. Warnings are only returned here, not emitted (``load_adapter`` emits them).
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
) -> LoraAdapter | SoftPrompt:
    """Validate (as :func:`inspect_adapter`), then read the tensors into host memory at ``dtype``.

    For LoRA, each B comes back multiplied by its module's PEFT scale. A base-model name mismatch
    is emitted with :func:`warnings.warn`.
    """
    _itemsize(dtype)
    plan = _validate(path, base, max_rank, max_bytes)
    for message in plan.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    where = f"adapter {plan.path}"
    tensors = _read_tensors(plan.weights, _needed_keys(plan), plan.tensors, where)
    if plan.kind == "soft_prompt":
        embeddings = tensors["prompt_embeddings"].to(dtype).contiguous()
        return SoftPrompt(name=name, path=plan.path, config=plan.config, embeddings=embeddings)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for module_key, module in plan.lora.items():
        a, b = tensors[module.key_a], tensors[module.key_b]
        weights[module_key] = (a.to(dtype).contiguous(), _scaled(b, module.scale, dtype))
        scales[module_key] = module.scale
    return LoraAdapter(name=name, path=plan.path, config=plan.config, weights=weights, scales=scales)


def _scaled(b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``b * scale`` computed in at least float32 (as PEFT does for float32 weights), then cast."""
    compute = torch.float64 if b.dtype == torch.float64 else torch.float32
    return (b.to(compute) * scale).to(dtype).contiguous()


def _needed_keys(plan: _Plan) -> list[str]:
    if plan.kind == "soft_prompt":
        return ["prompt_embeddings"]
    return [k for module in plan.lora.values() for k in (module.key_a, module.key_b)]


def _read_tensors(
    weights: Path, keys: list[str], infos: dict[str, _TensorInfo], where: str
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(weights), framework="pt") as fh:
            for key in keys:
                out[key] = fh.get_tensor(key)
    except Exception as exc:  # the header was vetted; anything now is I/O or a file changed underneath
        raise AdapterError(f"{where}: cannot read {weights.name}: {exc}") from None
    for key, tensor in out.items():
        if tuple(tensor.shape) != infos[key].shape:
            raise AdapterError(f"{where}: {key!r} changed on disk while loading; try again")
    return out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
