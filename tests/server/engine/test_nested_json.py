"""Deeply nested JSON in an adapter is refused as an AdapterError naming the limit, never a RecursionError.

`adapter_config.json` and the safetensors header are parsed with `bounded_json.load_json`, which
counts the nesting before json.loads (which recurses once per level) sees it: a document nested
100,000 deep raised RecursionError out of both validators, at a depth set by the interpreter's
recursion limit and the caller's stack. An integer of 5,000 digits raised a bare ValueError
(Python's 4,300-digit limit on int conversion); it is refused past 100 digits. Also: a safetensors
header length that cannot be right is refused without echoing it (it is the first 8 bytes of
whatever file was named).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.server.engine.adapter_errors import AdapterError
from loraplex.server.engine.bounded_json import MAX_JSON_DEPTH, MAX_JSON_INT_DIGITS, JSONLimitError, load_json
from loraplex.server.engine.peft_config import read_adapter_config
from loraplex.server.engine.safetensors_file import MAX_HEADER_BYTES, read_header

DEEP = 100_000
NESTED = {
    "arrays": "[" * DEEP + "]" * DEEP,
    "objects": '{"a":' * DEEP + "1" + "}" * DEEP,
    "mixed": '{"a":[' * (DEEP // 2) + "1" + "]}" * (DEEP // 2),
}
TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels"


def nested(depth: int) -> str:
    return '{"peft_type": "LORA", "x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def safetensors_bytes(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.fixture(scope="module")
def base_shape(tiny_model):
    import transformers

    from loraplex.server.engine.adapter_format import BaseModelShape

    return BaseModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(tiny_model))


def inspected(path: Path, base_shape) -> str:
    from loraplex.server.engine.adapters import inspect_adapter

    with pytest.raises(AdapterError) as refused:
        inspect_adapter(path, base_shape, 64)
    return str(refused.value)


@pytest.mark.parametrize("shape", list(NESTED))
def test_a_deeply_nested_config_is_refused_naming_the_limit(tmp_path, shape):
    (tmp_path / "adapter_config.json").write_text(NESTED[shape])
    with pytest.raises(AdapterError) as refused:
        read_adapter_config(tmp_path)
    message = str(refused.value)
    assert f"adapter {tmp_path}: adapter_config.json is {TOO_DEEP}" in message, message
    assert "recursion" not in message.lower()


def test_the_limit_is_the_projects_own_not_the_interpreters(tmp_path):
    """64 levels parse; 65 are refused although json.loads would parse them; brackets inside
    strings (escaped quotes and backslashes included) do not count."""
    (tmp_path / "adapter_config.json").write_text(nested(MAX_JSON_DEPTH))
    assert read_adapter_config(tmp_path)["peft_type"] == "LORA"
    (tmp_path / "adapter_config.json").write_text(nested(MAX_JSON_DEPTH + 1))
    json.loads(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(AdapterError, match=TOO_DEEP):
        read_adapter_config(tmp_path)
    tricky = {"peft_type": "LORA", "a": "[" * DEEP, "b": '\\"' + "{" * DEEP, "c": "\\" * 3 + "[" * DEEP}
    assert load_json(json.dumps(tricky)) == tricky
    within = {key: value[:4000] for key, value in tricky.items()}  # a config's strings are bounded too
    (tmp_path / "adapter_config.json").write_text(json.dumps(within))
    assert read_adapter_config(tmp_path) == within


def test_a_raised_recursion_limit_changes_nothing():
    """Where the recursion limit is raised (some libraries do), json.loads of a document 100,000
    deep overflowed the C stack and killed the process; the depth is refused before parsing."""
    code = ("import sys; sys.setrecursionlimit(10**7)\n"
            "from loraplex.server.engine.bounded_json import JSONLimitError, load_json\n"
            f"try:\n    load_json('[' * {10 * DEEP} + ']' * {10 * DEEP})\n"
            "except JSONLimitError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"refused: is {TOO_DEEP}" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_load_json_refuses_bytes_too():
    with pytest.raises(JSONLimitError, match=TOO_DEEP):
        load_json(NESTED["mixed"].encode())
    assert load_json(b'{"a": [[1]]}') == {"a": [[1]]}


def test_an_integer_of_5000_digits_is_refused_naming_the_limit(tmp_path):
    huge = "9" * 5000
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + huge + "}")
    with pytest.raises(AdapterError) as refused:
        read_adapter_config(tmp_path)
    assert str(refused.value) == (f"adapter {tmp_path}: adapter_config.json holds an integer of 5000 digits "
                                  f"(the limit is {MAX_JSON_INT_DIGITS})")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(safetensors_bytes(b'{"t": {"dtype": "F32", "shape": [-' + huge.encode() + b'], '
                                          b'"data_offsets": [0, 4]}}' + b"\0" * 4))
    with pytest.raises(AdapterError, match="corrupt header .its JSON holds an integer of 5000 digits"):
        read_header(weights, "adapter x", 1 << 30)
    assert load_json("[" + "9" * MAX_JSON_INT_DIGITS + ", -" + "9" * MAX_JSON_INT_DIGITS + "]")[0] > 0


@pytest.mark.parametrize("shape", list(NESTED))
def test_a_deeply_nested_safetensors_header_is_a_corrupt_header(tmp_path, shape):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(safetensors_bytes(NESTED[shape].encode()))
    with pytest.raises(AdapterError) as refused:
        read_header(weights, "adapter x", 1 << 30)
    message = str(refused.value)
    assert f"adapter x: adapter_model.safetensors has a corrupt header (its JSON is {TOO_DEEP}" in message, message


def test_nested_json_through_the_whole_validator(tmp_path, tiny_adapters, base_shape):
    path = tmp_path / "copy"
    shutil.copytree(tiny_adapters["attn4"], path)
    config = path / "adapter_config.json"
    good = config.read_text()
    config.write_text(NESTED["objects"])
    assert TOO_DEEP in inspected(path, base_shape)
    config.write_text(good)
    header = json.dumps({"__metadata__": None, "x": json.loads(nested(MAX_JSON_DEPTH))}).encode()
    deep_header = header.replace(b"[]", b"[" * DEEP + b"]" * DEEP)
    (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(deep_header))
    assert "corrupt header" in inspected(path, base_shape) and TOO_DEEP in inspected(path, base_shape)


@pytest.mark.parametrize("first8, size", [(b"password", 4096), (struct.pack("<Q", MAX_HEADER_BYTES + 1), 4096),
                                         (struct.pack("<Q", 5000), 4096)])
def test_an_implausible_header_length_is_not_echoed(tmp_path, first8, size):
    """A file named as adapter weights whose first 8 bytes are a secret's: the refusal must not
    carry them, as a number or otherwise."""
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(first8 + b"\0" * (size - 8))
    with pytest.raises(AdapterError) as refused:
        read_header(weights, "adapter x", 1 << 30)
    message = str(refused.value)
    assert "adapter x: adapter_model.safetensors does not start with a valid safetensors header length" in message
    assert f"the file is only {size} bytes" in message and f"at most {MAX_HEADER_BYTES} bytes" in message
    assert str(struct.unpack("<Q", first8)[0]) not in message
