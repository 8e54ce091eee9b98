"""Shared fixtures: a tiny random Llama (with its own byte-level tokenizer), real PEFT adapters
built from it, all inside the test session's temporary directory, and the correctness reference
(PEFT, one request at a time). Nothing is downloaded."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, initializer_range=0.3, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is loraplex serving many adapters",
    "SELECT name FROM users WHERE id = 1;",
    "translate to French: good morning -> bonjour",
] * 8


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0, model_type: str = "llama", **overrides) -> Path:
    """A randomly initialised Llama-family model directory (config, safetensors, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[model_type]
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    params = {**TINY, **overrides}
    config = config_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.eos_token_id, **params)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out)
    return out


def build_lora(model_dir: Path, out: Path, targets: list[str], r: int, alpha: int, seed: int,
               scale: float = 0.3, **lora_kwargs) -> Path:
    """A real PEFT LoRA adapter with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                        **lora_kwargs)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


def build_soft_prompt(model_dir: Path, out: Path, num_virtual: int, seed: int, scale: float = 1.0) -> Path:
    """A real PEFT prompt-tuning adapter with random virtual-token embeddings."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


def build_parity_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """The adapters a full-size model's parity is checked with (SmolLM2 here; the GPU check on the
    device): four LoRAs of ranks 2-16 (one rsLoRA) over different projections, and a soft prompt,
    at scales small enough for a 30-layer model to stay in its range."""
    attn, mlp = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
    return {
        "attn4": build_lora(model_dir, root / "attn4", attn, r=4, alpha=8, seed=11, scale=0.05),
        "mlp8": build_lora(model_dir, root / "mlp8", mlp, r=8, alpha=16, seed=12, scale=0.05),
        "all16": build_lora(model_dir, root / "all16", attn + mlp, r=16, alpha=16, seed=13, scale=0.03),
        "rs2": build_lora(model_dir, root / "rs2", ["q_proj", "v_proj"], r=2, alpha=4, seed=14, scale=0.1,
                          use_rslora=True),
        "soft": build_soft_prompt(model_dir, root / "soft", num_virtual=6, seed=15, scale=0.05),
    }


@pytest.fixture(scope="session")
def builders() -> SimpleNamespace:
    """The builders above, for tests (test modules cannot import conftest)."""
    return SimpleNamespace(llama=build_tiny_llama, lora=build_lora, soft_prompt=build_soft_prompt,
                           tokenizer=build_tokenizer, parity_adapters=build_parity_adapters)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Four LoRAs of different ranks and target sets, and one soft prompt."""
    root = tmp_path_factory.mktemp("adapters")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj"]
    return {
        "attn4": build_lora(tiny_model, root / "attn4", attn, r=4, alpha=8, seed=1, scale=0.2),
        "mlp8": build_lora(tiny_model, root / "mlp8", mlp, r=8, alpha=16, seed=2),
        "all16": build_lora(tiny_model, root / "all16", attn + mlp, r=16, alpha=16, seed=3, scale=0.15),
        "rs2": build_lora(tiny_model, root / "rs2", ["q_proj", "v_proj"], r=2, alpha=4, seed=4, use_rslora=True),
        "soft": build_soft_prompt(tiny_model, root / "soft", num_virtual=5, seed=5),
    }


# PostgreSQL (the shared registry) ----------------------------------------------------------
# .ci/run installs Debian's postgresql, starts it and exports LORAPLEX_TEST_POSTGRES (a DSN of
# a role that may create databases). Without that variable the session starts a private server
# from the installed binaries in its temporary directory; without either, the tests that need
# PostgreSQL fail with what to install (they are never skipped).


def _postgres_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_server():
    """A DSN (to the `postgres` database) of a running PostgreSQL server whose role may create databases."""
    import os
    import socket
    import subprocess

    dsn = os.environ.get("LORAPLEX_TEST_POSTGRES")
    if dsn:
        yield dsn
        return
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.fail("these tests need PostgreSQL: install Debian's 'postgresql' (.ci/run does) or set "
                    "LORAPLEX_TEST_POSTGRES=postgresql://user:pass@host:port/postgres")
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))  # not under pytest's root-only tmp dir
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(["chown", "-R", "postgres", str(root)], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "loraplex", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://loraplex@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server):
    """A fresh, empty database on the test server (a postgresql:// URL), dropped afterwards."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"loraplex_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(postgres_server)._replace(path=f"/{name}"))
    # FORCE may meet an autovacuum worker on the new database, a superuser's backend that a
    # non-superuser role may not terminate (InsufficientPrivilege): it is gone in a moment
    for attempt in range(40):
        try:
            with psycopg.connect(postgres_server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            if attempt == 39:
                raise
            time.sleep(0.25)


# ---------------------------------------------------------------------------- the correctness reference
# Hugging Face models with `peft` adapters, run one request at a time.


@dataclass
class Reference:
    tokens: list[int]  # greedy continuation
    logits: torch.Tensor  # [len(prompt) + len(tokens), vocab] teacher-forced, real positions only
    margins: list[float]  # top-1 minus top-2 logit at each generated step


def load_reference(model_dir: Path, lora: Path | None = None, soft: Path | None = None, quantize: str | None = None,
                   merge: bool = True):
    """The PEFT model serving `lora` and/or `soft` on the base.

    PEFT cannot stack prompt tuning on a LoRA model: for both together, by default (DESIGN.md)
    the LoRA is merged into the float base (merge_and_unload) and the prompt-tuning adapter
    applied on top. With merge=False, or on a quantized base (where merging would re-quantize),
    PEFT's LoRA model is fed the soft prompt's vectors in front of the prompt embeddings, which
    is what prompt tuning does; merging itself moves the logits of a 30-layer model by up to
    about 7e-5, most of the 1e-4 budget.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    for module in model.modules():  # the same float kernel the engine uses (see quantize.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    soft_vectors = None
    if lora is not None and soft is not None and (quantize or not merge):
        from safetensors.torch import load_file

        soft_vectors = load_file(str(soft / "adapter_model.safetensors"))["prompt_embeddings"].float()
        model = PeftModel.from_pretrained(model, lora)
    elif lora is not None and soft is not None:
        model = PeftModel.from_pretrained(model, lora).merge_and_unload()
        model = PeftModel.from_pretrained(model, soft)
    elif lora is not None or soft is not None:
        model = PeftModel.from_pretrained(model, lora or soft)
    model.eval()
    return model, soft_vectors


@torch.no_grad()
def reference_logits(model, ids: list[int], soft_vectors: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [len(ids), vocab] for real positions (virtual ones dropped)."""
    input_ids = torch.tensor([ids])
    if soft_vectors is not None:
        embeds = model.get_input_embeddings()(input_ids)
        embeds = torch.cat([soft_vectors[None].to(embeds.dtype), embeds], dim=1)
        logits = model(inputs_embeds=embeds).logits[0]
    else:
        logits = model(input_ids=input_ids).logits[0]
    return logits[-len(ids):].float()


def reference_greedy(model, prompt: list[int], steps: int, soft_vectors=None) -> Reference:
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(steps):
        last = reference_logits(model, prompt + tokens, soft_vectors)[-1]
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        tokens.append(int(last.argmax()))
    logits = reference_logits(model, prompt + tokens, soft_vectors)
    return Reference(tokens, logits, margins)


def comparable_steps(ref: Reference, atol: float) -> int:
    """Generated tokens are compared up to the first near-tie (margin below 2 * atol), which a
    different summation order may legitimately flip."""
    for i, m in enumerate(ref.margins):
        if m < 2 * atol:
            return i
    return len(ref.margins)


@pytest.fixture(scope="session")
def reference() -> SimpleNamespace:
    return SimpleNamespace(load=load_reference, greedy=reference_greedy, logits=reference_logits,
                           comparable=comparable_steps)
