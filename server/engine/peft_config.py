"""Read ``adapter_config.json`` and apply the PEFT config rules loraplex serves under.

:func:`read_adapter_config` parses the file; :func:`adapter_kind` maps its ``peft_type`` to
``"lora"`` or ``"soft_prompt"``; :func:`check_lora_config` and :func:`check_prompt_config` vet the
rest of the config for that kind. :func:`pattern_value` and :func:`lora_scale` apply PEFT's
per-module ``rank_pattern`` / ``alpha_pattern`` rules and its LoRA scale, and
:func:`base_model_warnings` notes an adapter trained on a differently named base model, and
:func:`report_base_model` logs such notes once per adapter. The file is parsed with
`bounded_json.load_json` (nesting and integers bounded) and no string in it may be longer than
:data:`MAX_CONFIG_STRING` characters: the registry stores the base model's name with the adapter,
and a 15 MB one once made every Admin listing too large to send.

Options the engine does not implement are refused by name rather than ignored, and so is any
config key this module does not know whose value is set: a future PEFT feature that changes the
maths must fail loudly, not serve subtly wrong outputs. Every refusal is an :class:`AdapterError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Union

from .adapter_errors import AdapterError, is_finite_number, is_int, short
from .bounded_json import JSONLimitError, load_json
from .module_regex import matching, pattern_key_regex

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "read_adapter_config",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT_DIGITS",
    "JSONLimitError",
    "load_json",
    "adapter_kind",
    "check_lora_config",
    "check_prompt_config",
    "lora_r",
    "pattern_value",
    "lora_scale",
    "base_model_warnings",
    "report_base_model",
    "model_name",
]

log = logging.getLogger("loraplex.adapters")  # the adapter loader's log, where operators read base-model notes

# The file names PEFT's save_pretrained writes.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_MAX_CONFIG_BYTES = 1024 * 1024  # real configs are about 1 KB; per-module rank patterns of a big model, ~60 KB
# Characters in any one string of the config: a path to the base model (Linux's PATH_MAX is
# 4096), a module regex, a prompt-tuning init text.
MAX_CONFIG_STRING = 4096
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Reading the config and telling the kind
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
        config = load_json(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(
            f"adapter {path}: {CONFIG_NAME} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except JSONLimitError as exc:
        raise AdapterError(f"adapter {path}: {CONFIG_NAME} {exc}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise AdapterError(f"adapter {path}: cannot read {CONFIG_NAME}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"adapter {path}: {CONFIG_NAME} must hold a JSON object, found {type(config).__name__}"
        )
    long = _long_string(config)
    if long is not None:
        where, size = long
        raise AdapterError(f"adapter {path}: {CONFIG_NAME} {where} is a string of {size} characters; the limit is "
                           f"{MAX_CONFIG_STRING}")
    return config


def _long_string(value: Any, where: str = "") -> tuple[str, int] | None:
    """(where, length) of the first string (a key or a value) over MAX_CONFIG_STRING inside `value`."""
    if isinstance(value, str):
        return (where or "a value", len(value)) if len(value) > MAX_CONFIG_STRING else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and len(key) > MAX_CONFIG_STRING:
            return f"a key{' in ' + where if where else ''}", len(key)
        found = _long_string(item, f"{where}[{key!r}]" if where else str(key))
        if found is not None:
            return found
    return None


_OTHER_PROMPT_LEARNING = frozenset(
    {"PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}
)


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


# --------------------------------------------------------------------------------------------
# LoRA config rules
# --------------------------------------------------------------------------------------------

# Bookkeeping every PEFT config carries, whatever its kind.
_COMMON_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    }
)

# LoraConfig keys (peft/tuners/lora/config.py and PeftConfig) that never change what a saved
# adapter computes at inference: bookkeeping, training-time options, and options whose effect is
# already baked into the saved tensors or is honoured when the adapter is planned (rank_pattern,
# alpha_pattern, use_rslora, layers_to_transform). megatron_core and qalora_group_size are only
# read when megatron_config / use_qalora are set, which are refused.
_LORA_HARMLESS_KEYS = _COMMON_KEYS | frozenset(
    {
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


def check_lora_config(config: dict, where: str) -> None:
    """Validate a LORA config: refused options, init, unknown keys, r, lora_alpha and the patterns."""
    _check_task_type(config, where)
    for key, (is_set, what) in _LORA_REFUSED_OPTIONS.items():
        if key in config and is_set(config[key]):
            raise AdapterError(
                f"{where}: {CONFIG_NAME} sets {key} = {short(config[key])} ({what}), which loraplex does not implement"
            )
    _check_init(config.get("init_lora_weights", True), where)
    known = _LORA_HARMLESS_KEYS | frozenset(_LORA_REFUSED_OPTIONS)
    _check_unknown_keys(config, known, where)

    r, alpha = lora_r(config), _lora_alpha(config)
    if not (is_int(r) and r > 0):
        raise AdapterError(f"{where}: {CONFIG_NAME} r must be a positive integer, found {r!r}")
    if not is_finite_number(alpha):
        raise AdapterError(f"{where}: {CONFIG_NAME} lora_alpha must be a finite number, found {alpha!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{where}: {CONFIG_NAME} use_rslora must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{where}: {CONFIG_NAME} {key} must be an object, found {short(pattern)}")
        for k, v in pattern.items():
            ok = is_int(v) and v > 0 if key == "rank_pattern" else is_finite_number(v)
            if not ok:
                raise AdapterError(f"{where}: {CONFIG_NAME} {key}[{short(k, 60)}] = {short(v)} is not a valid value")
            pattern_key_regex(k, f"{CONFIG_NAME} {key} key {short(k, 60)}", where)


def _check_init(init: Any, where: str) -> None:
    """Accept init_lora_weights values that only affect training; refuse the rest."""
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
        f"{where}: {CONFIG_NAME} has init_lora_weights = {short(init)}, which loraplex does not recognise"
    )


def lora_r(config: dict) -> Any:
    """``r`` as PEFT reads it: LoraConfig's default (8) when the key is absent."""
    return config.get("r", 8)


def _lora_alpha(config: dict) -> Any:
    """``lora_alpha`` as PEFT reads it: LoraConfig's default (8) when the key is absent."""
    return config.get("lora_alpha", 8)


def pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first key k with ``(.*\\.)?(k)$`` matching wins."""
    for key in pattern:
        what = f"{CONFIG_NAME} pattern key {short(key, 60)}"
        if matching(pattern_key_regex(key, what, module), [module], False, what, module)[0]:
            return pattern[key]
    return pattern.get(module, default)


def lora_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scale for ``module``: alpha (or its alpha_pattern value) over rank, or sqrt(rank) with rsLoRA."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, _lora_alpha(config))
    if config.get("use_rslora", False):
        return alpha / math.sqrt(rank)
    return alpha / rank


# --------------------------------------------------------------------------------------------
# Prompt-tuning config rules
# --------------------------------------------------------------------------------------------

_PROMPT_HARMLESS_KEYS = _COMMON_KEYS | frozenset(
    {
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


def check_prompt_config(config: dict, where: str) -> int:
    """Validate a PROMPT_TUNING config; return its num_virtual_tokens."""
    _check_task_type(config, where)
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: {CONFIG_NAME} sets modules_to_save = {short(config['modules_to_save'])}, "
            "which loraplex does not implement"
        )
    _check_unknown_keys(config, _PROMPT_HARMLESS_KEYS, where)
    tokens = config.get("num_virtual_tokens")
    if not (is_int(tokens) and tokens > 0):
        raise AdapterError(f"{where}: {CONFIG_NAME} num_virtual_tokens must be a positive integer, found {tokens!r}")
    submodules = config.get("num_transformer_submodules")
    if submodules is not None and submodules != 1:
        raise AdapterError(
            f"{where}: {CONFIG_NAME} num_transformer_submodules = {submodules!r}; only 1 (decoder-only) is supported"
        )
    # token_dim is not checked here: the prompt_embeddings shape check says more (both shapes).
    return tokens


# --------------------------------------------------------------------------------------------
# Rules shared by both kinds
# --------------------------------------------------------------------------------------------


def _check_task_type(config: dict, where: str) -> None:
    """Refuse any task_type other than CAUSAL_LM (an absent task_type is accepted)."""
    task_type = config.get("task_type")
    if task_type is not None and task_type != "CAUSAL_LM":
        raise AdapterError(
            f"{where}: task_type {task_type!r} is not supported; loraplex serves CAUSAL_LM adapters"
        )


def _check_unknown_keys(config: dict, known: frozenset[str], where: str) -> None:
    """Refuse the first key outside ``known`` whose value is set (truthy)."""
    for key in sorted(config):
        if key not in known and config[key]:
            raise AdapterError(
                f"{where}: {CONFIG_NAME} sets {key!r} = {short(config[key])}, an option loraplex does not "
                "recognise; refusing rather than ignoring it (it may change what the adapter computes)"
            )


def base_model_warnings(config: dict, served_name: str) -> list[str]:
    """``["trained on X; serving Y"]`` when the config's base_model_name_or_path names another
    model than ``served_name``, both by :func:`model_name` and compared case-insensitively; an
    empty name on either side means there is nothing to compare and no warning. (The shapes
    fit, or validation would have refused the adapter.)
    """
    theirs, ours = model_name(config.get("base_model_name_or_path")), model_name(served_name)
    if not theirs or not ours or theirs.casefold() == ours.casefold():
        return []
    return [f"trained on {theirs}; serving {ours}"]


_reported: set[tuple[str, str]] = set()  # (name, path) of each adapter whose notes were logged
_reported_lock = threading.Lock()  # loads run on the reader thread, registrations on the engine's


def report_base_model(name: str, path: PathLike, notes: list[str]) -> None:
    """Log an adapter's base-model notes (:func:`base_model_warnings`), one line each, the
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


# A GGUF file name's quantization tag: SmolLM2-135M-Instruct.Q4_1.gguf, llama-7b-Q4_K_M.gguf, x.f16.gguf
_GGUF_TAG = re.compile(r"[.-](?:I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)
# loader.convert_gguf's cache directory for a GGUF file: .../models/<file stem>-<bytes>-<mtime>
_CONVERTED = re.compile(r"-\d+-\d+$")


def model_name(name_or_path: Any) -> str:
    """What people call the model ``name_or_path`` (a Hub id, a directory or a ``.gguf`` file)
    holds: its last path component; for a GGUF file, and for loraplex's converted copy of one
    (what an adapter trained on the default model records), the file's stem without its
    quantization tag, so ``.../SmolLM2-135M-Instruct.Q4_1.gguf`` is ``SmolLM2-135M-Instruct``.
    ``""`` for a non-string. (A GGUF file's own ``general.name`` is no better: the default
    model's is "Smollm2 135M 8k Lc100K Mix1 Ep2".)
    """
    if not isinstance(name_or_path, str):
        return ""
    parent, _, name = name_or_path.replace("\\", "/").rstrip("/").rpartition("/")
    name = name.strip()
    if name.lower().endswith(".gguf"):
        return _GGUF_TAG.sub("", name[: -len(".gguf")])
    if parent.rpartition("/")[2] == "models" and _CONVERTED.search(name):
        return _GGUF_TAG.sub("", _CONVERTED.sub("", name))
    return name
