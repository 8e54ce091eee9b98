"""Per-request sampling for a batch of next-token logits.

Every row of the batch carries its own ``SamplingParams``. Temperature, top-k and top-p
are applied to all sampled rows at once (one sort over the vocabulary); the only Python
loop is over rows that own a seeded ``torch.Generator``, because each of those must draw
its randomness from its own stream so that a seeded request gives the same tokens
whatever else shares the batch.

The draw itself is an exponential race: with ``E_i ~ Exponential(1)`` independent,
``argmax_i p_i / E_i`` is distributed as ``Categorical(p)``. This turns sampling into a
vectorised noise draw plus an argmax, and the noise for a row depends only on that row's
generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

MAX_STOP_STRINGS = 16
MAX_N = 16  # completions per request
MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows
_SEED_LIMIT = 2**63


@dataclass
class SamplingParams:
    """How one request picks its tokens. Call ``validate()`` before use."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # same seed + same prompt => same tokens, whatever the batch
    stop: tuple[str, ...] = ()  # stop strings
    ignore_eos: bool = False
    n: int = 1  # completions of the same prompt; completion i of a seeded request uses seed + i
    logprobs: bool = False  # return each chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives (needs logprobs)

    def __post_init__(self) -> None:
        # Accept any non-string sequence of stop strings (a list, a protobuf repeated field).
        if not isinstance(self.stop, (tuple, str)):
            self.stop = tuple(self.stop)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and why."""
        _check_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

        _check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")

        _check_real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

        self._validate_stop()

        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")

        _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {type(self.logprobs).__name__}")
        _check_int("top_logprobs", self.top_logprobs)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")

    def seed_for(self, index: int) -> int | None:
        """The seed of completion `index`: completion 0 is the request's own seed, so a seeded
        request with n > 1 starts with exactly what the same request with n = 1 gives."""
        return None if self.seed is None else (self.seed + index) % _SEED_LIMIT

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
            )
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                raise ValueError(f"stop[{i}] must be a string, got {type(s).__name__}")
            if not s:
                raise ValueError(f"stop[{i}] must not be an empty string")


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass, but True as a token count is a caller bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], top_n: list[int]
                   ) -> list[TokenLogprob]:
    """Log-probabilities of the chosen `tokens` at `rows` of `logits` [B, V], with the `top_n[i]`
    most likely tokens of row `rows[i]`.

    They are the model's own distribution: log_softmax of the raw logits, before temperature,
    top-k and top-p (what vLLM returns by default, and what OpenAI's API describes), so the
    values do not depend on how the token was drawn and a sampled token may have been outside
    the filtered set's top entries.
    """
    if not rows:
        return []
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits[index].float(), dim=-1)  # [R, V]
    chosen = logp.gather(1, tokens[index].view(-1, 1)).squeeze(1).tolist()  # [R]
    top_values, top_ids = logp.topk(min(max(top_n), logp.shape[-1]), dim=-1)  # [R, k]; k may be 0
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    chosen_ids = tokens[index].tolist()
    return [
        TokenLogprob(chosen_ids[i], chosen[i], tuple(zip(top_ids[i][:top_n[i]], top_values[i][:top_n[i]])))
        for i in range(len(rows))
    ]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed``, or ``None`` (use the global RNG) when unseeded."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


ARGMAX_BLOCK = 256  # widest block of a row that `row_argmax` reduces with amax


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] long: the same as x.argmax(-1) (ties: the lowest index), in two stages.

    On a CPU argmax over a row is a scalar loop (0.9 ms for 32 rows of 49,152) while amax is
    vectorised (0.04 ms): so take each block's max with amax, the first block holding the row's
    max, then the argmax inside that block alone. The first block with the max holds its lowest
    index, so ties resolve as argmax resolves them. Rows whose width has no block of at least 16
    dividing it take the plain argmax."""
    rows, width = x.shape
    block = next((b for b in (ARGMAX_BLOCK, 128, 64, 32, 16) if width % b == 0), None)
    if x.device.type != "cpu" or block is None or width == block:
        return x.argmax(dim=-1)
    blocks = x.view(rows, width // block, block)
    first = blocks.amax(dim=-1).argmax(dim=-1)  # [B] the first block holding each row's max
    inside = blocks[torch.arange(rows, device=x.device), first].argmax(dim=-1)  # [B]
    return first * block + inside


class Sampler:
    """Picks the next token of every row in a batch, each row under its own params."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """logits [B, V] (any float dtype; computed in float32) -> next token ids [B] (long)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"got {batch} logit rows, {len(params)} params and {len(generators)} generators"
            )
        logits = logits.float()  # [B, V]
        device = logits.device

        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        temperature = temperature.to(device)  # [B]
        # A temperature that underflows float32 is greedy too: dividing by 0 would give NaN.
        sampled = temperature > 0  # [B]
        tokens = row_argmax(logits)  # [B]; ties -> lowest index
        if not bool(sampled.any()):
            return tokens

        rows = sampled.nonzero().squeeze(1)  # [S]
        row_list = rows.tolist()
        probs = _filtered_probs(
            logits[rows],
            temperature[rows],
            top_k=torch.tensor([params[r].top_k for r in row_list], device=device),
            top_p=torch.tensor([params[r].top_p for r in row_list], device=device),
        )  # [S, V]
        noise = _exponential_noise(probs.shape, device, [generators[r] for r in row_list])
        tokens[rows] = row_argmax(probs / noise)
        return tokens


def _filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Tempered, top-k then top-p filtered, renormalised probabilities.

    logits [S, V] float32, temperature [S] (> 0), top_k [S] long (0 = off), top_p [S]
    -> probs [S, V] in vocabulary order, exactly 0 outside the kept set.
    """
    vocab = logits.shape[-1]
    # Shift by the row max first so the top logit is 0 whatever the temperature:
    # tiny temperatures then push the rest to -inf instead of overflowing to inf - inf.
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # [S, V]
    scaled = shifted / temperature[:, None]  # [S, V]

    # Stable descending sort: among equal logits the lowest vocabulary id comes first,
    # so top_k=1 agrees with argmax.
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)  # [S, V]
    rank = torch.arange(vocab, device=logits.device)  # [V]

    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [S]
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], -math.inf)

    sorted_probs = sorted_logits.softmax(dim=-1)  # [S, V]
    # Drop a token when the tokens ranked above it already reach top_p. The top token is
    # always kept (nothing ranks above it), and rows with top_p == 1 skip the test so that
    # float rounding in the cumulative sum can never cut off a tail token.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V]
    drop = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)

    return torch.zeros_like(sorted_probs).scatter_(-1, sorted_ids, sorted_probs)


def _exponential_noise(
    shape: torch.Size, device: torch.device, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Exponential(1) noise [S, V]; rows with a generator draw from it, the rest share the
    global RNG in one draw."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        draw = torch.empty((len(unseeded), shape[-1]), dtype=torch.float32, device=device)
        noise[unseeded] = draw.exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            # Drawn on the generator's own device so a CPU generator also serves GPU logits.
            row = torch.empty(shape[-1], dtype=torch.float32, device=g.device)
            noise[i] = row.exponential_(generator=g).to(device)
    # A zero draw would turn a filtered-out token's 0 / 0 into NaN, which argmax prefers.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)
