"""Fuzzing adapter_config.json validation: `peft_config.read_adapter_config`, `adapter_kind`,
`check_lora_config`, `check_prompt_config`, and the whole `adapters.inspect_adapter` that an
upload goes through.

The property: whatever the config says, each validator either accepts it or refuses it with
`AdapterError`; it never lets another exception out (ValueError from a 5,000-digit integer,
OverflowError from a lora_alpha past float's range, OverflowError or RecursionError from a pattern
re.compile cannot build, TypeError, ...) and never takes long (a rank_pattern key is a regex
matched against every module name: a backtracking one must not hang the server). An accepted
adapter is one the engine can serve: its kind, ranks and virtual tokens are the weights' own.
Configs are the real PEFT configs of a tiny LoRA and a tiny soft prompt (the weights stay real),
mutated: any JSON value for any known, refused or unknown key, numbers at the limits, regexes
that do not compile or backtrack, a whole config that is not an object, invalid UTF-8 and deep
nesting.

Runs are fixed (derandomized, no example database) so they cannot flake; a longer run is one
command, e.g.

    LORAPLEX_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/server/engine/test_fuzz_adapter_config.py -k fuzz
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fuzzing import Raw, any_json, dump, fuzz, refused
from hypothesis import example, given
from hypothesis import strategies as st

from loraplex.server.engine.adapter_errors import AdapterError
from loraplex.server.engine.adapters import inspect_adapter
from loraplex.server.engine.peft_config import (
    CONFIG_NAME, adapter_kind, check_lora_config, check_prompt_config, read_adapter_config)

MAX_RANK = 64

# ---------------------------------------------------------------------------- JSON values

RAW_TOKENS = [Raw("1" * 5000), Raw("1" * 4300), Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"), Raw("-0"),
              Raw('"\\ud800"'), Raw('"\\u0000"'), Raw("[" * 60 + "]" * 60), Raw('{"a":' * 70 + "1" + "}" * 70),
              Raw("[" * 5000 + "]" * 5000)]
EDGE_INTS = [-1, 0, 1, 2, 4, 8, 64, 65, 2**31, 2**63 - 1, 2**63, 2**64, -2**63, 10**30, 10**308, 2 * 10**308, 10**400]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 4.0]
EDGE_STRINGS = ["", "none", "\x00", "\ud800", "x" * 10_000]
json_values = any_json(EDGE_INTS, EDGE_FLOATS, EDGE_STRINGS, st.sampled_from(RAW_TOKENS), max_leaves=12)


# ---------------------------------------------------------------------------- configs

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Patterns a rank_pattern / alpha_pattern key or target_modules may hold: PEFT's usual ones, and
# ones that do not compile (re.error, OverflowError, RecursionError) or backtrack for ever.
PATTERNS = ["q_proj", "model.layers.0.self_attn.q_proj", ".*q_proj", r"layers\.1\..*", ".*", "", "[", "(?P<x>", "\\",
            "*", "a{4294967296}", "(" * 1200 + ")" * 1200, "(.*)*X", "(.*a){30}", "((.+)+)+y"]
names = st.sampled_from(MODULES + ["lm_head", "embed_tokens", "mlp", "self_attn", "fc1", ""]) | st.text(max_size=8)
patterns = st.sampled_from(PATTERNS) | names
ints = st.sampled_from(EDGE_INTS) | st.integers(-2, 70) | st.sampled_from(RAW_TOKENS[:3])
numbers = st.sampled_from(EDGE_INTS + EDGE_FLOATS) | ints | st.floats()
NEAR: dict[str, st.SearchStrategy] = {
    "peft_type": st.sampled_from(["LORA", "lora", "PROMPT_TUNING", "prompt_tuning", "PREFIX_TUNING", "IA3", "",
                                  "LoRA"]),
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "causal_lm", ""]),
    "r": ints, "lora_alpha": numbers, "num_virtual_tokens": ints, "num_transformer_submodules": ints,
    "token_dim": ints,
    "rank_pattern": st.dictionaries(patterns, ints, max_size=3),
    "alpha_pattern": st.dictionaries(patterns, numbers, max_size=3),
    "target_modules": st.lists(names, max_size=4) | patterns | st.just("all-linear"),
    "layers_to_transform": st.lists(ints, max_size=3) | ints,
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "pissa_niter_4", "olora", "loftq",
                                          "eva", "GAUSSIAN", "xavier"]),
    "use_rslora": st.booleans(), "use_dora": st.booleans(), "bias": st.sampled_from(["none", "all", "lora_only"]),
    "base_model_name_or_path": st.sampled_from(["", "HuggingFaceTB/SmolLM2-135M", "/models/x.Q4_1.gguf", "/"]),
}
KNOWN_KEYS = sorted(NEAR) + ["modules_to_save", "fan_in_fan_out", "lora_bias", "layer_replication",
                             "megatron_config", "alora_invocation_tokens", "target_parameters", "lora_dropout",
                             "trainable_token_indices", "use_qalora", "loftq_config", "exclude_modules",
                             "prompt_tuning_init", "tokenizer_kwargs", "inference_mode", "peft_version",
                             "revision", "auto_mapping", "future_option", "", "__proto__"]


@dataclass(frozen=True)
class ConfigCase:
    """A mutation of one tiny adapter's real config: keys to set, keys to drop, or a whole
    replacement; then how the file's bytes are damaged (if at all)."""

    adapter: str  # "lora" or "soft"
    set: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    whole: Any = None  # not None: the file holds this JSON value instead
    damage: str = "none"  # "none", "invalid utf-8", "cut" or "bom"

    def text(self, base: dict) -> bytes:
        config = {k: v for k, v in base.items() if k not in self.drop} | self.set
        raw = dump(self.whole if self.whole is not None else config).encode("utf-8", "surrogatepass")
        middle = len(raw) // 2
        return {"none": raw, "invalid utf-8": raw[:middle] + b"\xff\xfe" + raw[middle:], "cut": raw[:middle],
                "bom": b"\xef\xbb\xbf" + raw}[self.damage]


@st.composite
def key_values(draw: st.DrawFn) -> tuple[str, Any]:
    """Any key with any JSON value."""
    key = draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))
    near = NEAR.get(key)
    return key, draw(near | json_values if near is not None else json_values)


@st.composite
def config_cases(draw: st.DrawFn) -> ConfigCase:
    """One key the validators read, set to a value of its own type at the limits, and maybe a
    few more of any kind."""
    primary = draw(st.sampled_from(sorted(NEAR)))
    pairs = [(primary, draw(NEAR[primary]))] + draw(st.lists(key_values(), max_size=2))
    drop = draw(st.sampled_from([[]] * 3) | st.lists(st.sampled_from(KNOWN_KEYS), max_size=2))
    return ConfigCase(
        adapter=draw(st.sampled_from(["lora", "soft"])), set=dict(pairs), drop=tuple(drop),
        whole=draw(st.sampled_from([None] * 7) | json_values),
        damage=draw(st.sampled_from(["none"] * 9 + ["invalid utf-8", "cut", "bom"])))


# ---------------------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def adapters(tiny_adapters, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A private copy of a tiny LoRA (rank 4, attention) and a soft prompt (5 tokens), with each
    one's original config; the fuzz rewrites the copies' configs."""
    root = tmp_path_factory.mktemp("fuzz-config")
    out = {}
    for kind, source in (("lora", tiny_adapters["attn4"]), ("soft", tiny_adapters["soft"])):
        copy = Path(shutil.copytree(source, root / kind))
        out[kind] = (copy, json.loads((copy / CONFIG_NAME).read_text()))
    return out


@pytest.fixture(scope="module")
def base_shape(tiny_model):
    import transformers

    from loraplex.server.engine.adapter_format import BaseModelShape

    return BaseModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(tiny_model))


def accepted(check: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, result) or (False, None) for an AdapterError; any other exception fails the test."""
    no, result = refused(check, (AdapterError,), says_why)
    return not no, result


def says_why(exc: Exception) -> None:
    assert str(exc), "a refusal says why"


def check_case(adapters: dict, base_shape, case: ConfigCase) -> None:
    directory, original = adapters[case.adapter]
    (directory / CONFIG_NAME).write_bytes(case.text(original))
    ok, config = accepted(lambda: read_adapter_config(directory))
    if ok:
        assert isinstance(config, dict)
        ok_kind, kind = accepted(lambda: adapter_kind(config))
        accepted(lambda: check_lora_config(config, "fuzz"))
        ok_prompt, tokens = accepted(lambda: check_prompt_config(config, "fuzz"))
        assert not ok_kind or kind in ("lora", "soft_prompt")
        assert not ok_prompt or (isinstance(tokens, int) and tokens > 0)
    ok_inspect, summary = accepted(lambda: inspect_adapter(directory, base_shape, MAX_RANK))
    if ok_inspect:  # what the weights really are, whatever the config claimed
        assert ok and summary["kind"] == adapter_kind(config)
        if case.adapter == "lora":
            assert summary["kind"] == "lora" and summary["max_rank"] == 4
            assert summary["ranks"] == {p: 4 for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        else:
            assert summary["kind"] == "soft_prompt" and summary["num_virtual_tokens"] == 5


@given(config_cases())
# Found by this test (minimal examples; each fails on the defect named):
# RecursionError: re.compile of 1,200 nested groups, an alpha_pattern key (check_lora_config)
@example(ConfigCase("lora", set={"alpha_pattern": {"(" * 1200 + ")" * 1200: -1}}))
# OverflowError: re.compile("a{4294967296}") of target_modules (adapters._check_target_modules); a
# rank_pattern or alpha_pattern key fails alike (check_lora_config)
@example(ConfigCase("lora", set={"target_modules": "a{4294967296}"}))
@example(ConfigCase("lora", set={"rank_pattern": {"a{4294967296}": 4}}))
# TooSlow: a backtracking rank_pattern key, matched against every module name, never finishes
# (peft_config.pattern_value from adapters._plan_module)
@example(ConfigCase("lora", set={"rank_pattern": {"((.+)+)+y": 4}}))
# Found first, since fixed in the working tree by bounded_json's digit limit (kept so they stay fixed):
# ValueError: json.loads refused an integer over 4,300 digits with a plain ValueError (load_json);
# OverflowError: math.isfinite() of a 4,300-digit lora_alpha (adapter_errors.is_finite_number)
@example(ConfigCase("soft", set={"num_virtual_tokens": Raw("1" * 5000)}))
@example(ConfigCase("lora", set={"lora_alpha": Raw("1" * 4300)}))
@fuzz(400)
def test_fuzz_adapter_config_is_accepted_or_refused(adapters, base_shape, case: ConfigCase) -> None:
    check_case(adapters, base_shape, case)


@given(st.sampled_from(["lora", "soft"]))
@fuzz(10)
def test_fuzz_unmutated_configs_are_accepted(adapters, base_shape, adapter: str) -> None:
    directory, original = adapters[adapter]
    (directory / CONFIG_NAME).write_bytes(ConfigCase(adapter).text(original))
    assert inspect_adapter(directory, base_shape, MAX_RANK)["kind"] == {"lora": "lora", "soft": "soft_prompt"}[adapter]
