"""How much input one token can stand for, read from a tokenizer's vocabulary.

Why: a text longer than (tokens it may have) × (the most characters one token covers) cannot be
that few tokens, so the engine refuses it by its size without tokenizing it (see intake.py: a
1 MiB prompt costs about 2 s of tokenizer CPU). The bound must hold for every text, so it is only
derived where the tokenizer's pipeline cannot drop input: a fast BPE model whose normalizer is one
of a known set (each with how many input characters can become one output character), whose
pre-tokenizers keep every character, and whose added tokens strip nothing. Anywhere else
:func:`token_span` says None and only the growing-prefix check applies.

Measured: 5 characters and 5 bytes on the tests' tiny tokenizer (its ``<unk>``), 81 and 81 on
SmolLM2 (a newline and 80 spaces), read in 0.1 s.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

# Input characters and UTF-8 bytes one character of a normalizer's output can come from, at most.
# Composing: ᾂ is 4 code points (8 bytes) in, 1 out; the Kelvin sign (3 bytes) becomes K (1 byte),
# a fullwidth Ａ (3 bytes) A. Normalizers not listed (Strip, StripAccents, BERT's, SentencePiece's
# Precompiled) can drop input without bound: no size bound is derived for them.
NORMALIZER_SHRINK = {"NFC": (4, 6), "NFKC": (4, 6), "NFD": (1, 3), "NFKD": (1, 3), "Lowercase": (1, 3),
                     "Prepend": (1, 1)}
# Pre-tokenizers that keep every character (others drop whitespace or delimiters)
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


@dataclass(frozen=True)
class TokenSpan:
    """The most input one token stands for: text longer than tokens × this cannot be that few tokens."""

    chars: int
    bytes: int


def token_span(tokenizer) -> TokenSpan | None:
    """The most characters and UTF-8 bytes of input any one token of `tokenizer` stands for, read
    from its vocabulary (a byte-level token's characters are its bytes; a SentencePiece "▁" is a
    space) and its added tokens (matched literally); None where no bound holds: not a fast BPE
    tokenizer, or one whose normalizer, pre-tokenizer or added tokens can drop input."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, added = spec.get("model") or {}, spec.get("added_tokens") or []
    shrink = _normalizer_shrink(spec.get("normalizer"))
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel")
    if (shrink is None or model.get("type") != "BPE" or model.get("fuse_unk")
            or not _keeps_every_char(spec.get("pre_tokenizer"))
            or not (byte_level or model.get("byte_fallback") or model.get("unk_token"))
            or any(a.get("lstrip") or a.get("rstrip") for a in added)):
        return None
    spans = [(len(t), len(t) if byte_level else len(t.replace("▁", " ").encode())) for t in model["vocab"]]
    spans += [(len(a["content"]), len(a["content"].encode())) for a in added]
    spans.append((1, 4))  # an unknown character's <unk> or byte-fallback token: one character
    return TokenSpan(max(c for c, _ in spans) * shrink[0], max(b for _, b in spans) * shrink[1])


def _normalizer_shrink(spec: dict | None) -> tuple[int, int] | None:
    """(characters, bytes) of input per character of the normalizer's output, at most; None: unbounded."""
    if spec is None:
        return 1, 1
    kind = spec.get("type")
    if kind == "Sequence":
        factors = [_normalizer_shrink(s) for s in spec.get("normalizers", [])]
        if any(f is None for f in factors):
            return None
        return math.prod(f[0] for f in factors), math.prod(f[1] for f in factors)
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content") or ""
        if pattern is None or not content:
            return None
        return math.ceil(len(pattern) / len(content)), math.ceil(len(pattern.encode()) / len(content.encode()))
    return NORMALIZER_SHRINK.get(kind)


def _keeps_every_char(spec: dict | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_every_char(s) for s in spec.get("pretokenizers", []))
    return spec.get("type") in KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _has_type(spec: dict | None, kind: str) -> bool:
    if spec is None:
        return False
    return spec.get("type") == kind or any(_has_type(s, kind) for s in spec.get("pretokenizers", []))
