"""Finding and loading the base model: HF directories, GGUF conversion cache, refusals."""
from __future__ import annotations

import shutil

import pytest

from loraplex.server.engine import loader
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine


def test_default_model_is_converted_once_then_read_from_the_cache(monkeypatch):
    first = loader.resolve_model(None)  # converts on the first use on this machine
    assert (first / "model.safetensors").is_file() and (first / "config.json").is_file()
    assert (first / "tokenizer.json").is_file() or (first / "tokenizer_config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    import transformers

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was dequantized again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert loader.resolve_model(None) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten


def test_a_gguf_path_resolves_to_the_same_cache_as_the_default():
    assert loader.resolve_model(str(loader.default_gguf())) == loader.resolve_model(None)


def test_refusals_name_the_problem(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.resolve_model(tmp_path / "nothing")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="a Hugging Face directory or a .gguf file"):
        loader.resolve_model(tmp_path / "weights.txt")
    with pytest.raises(ValueError, match="no config.json"):
        loader.resolve_model(tmp_path)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="never unpickles"):
        Engine(EngineConfig(model=str(pickled)))


def test_unsupported_architectures_are_refused(tmp_path, tiny_model):
    import json

    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported"):
        Engine(EngineConfig(model=str(other)))
