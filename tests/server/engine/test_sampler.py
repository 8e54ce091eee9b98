import math

import pytest
import torch

from loraplex.server.engine.sampler import Sampler, SamplingParams, make_generator, row_argmax

sampler = Sampler()


def _sample(logits: torch.Tensor, params: list[SamplingParams], seeds=None) -> torch.Tensor:
    seeds = seeds if seeds is not None else [None] * len(params)
    return sampler(logits, params, [make_generator(s) for s in seeds])


def _repeat(logits_row: list[float], n: int, **kw) -> tuple[torch.Tensor, list[SamplingParams]]:
    """The same row n times: n independent draws (unseeded rows share the global RNG)."""
    logits = torch.tensor([logits_row], dtype=torch.float32).expand(n, -1).contiguous()
    return logits, [SamplingParams(**kw) for _ in range(n)]


# ---------------------------------------------------------------- greedy and its limits


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    out = _sample(logits, [SamplingParams() for _ in range(8)])
    assert out.dtype == torch.long and out.shape == (8,)
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_ties_take_lowest_index():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    out = _sample(logits, [SamplingParams(), SamplingParams()])
    assert out.tolist() == [1, 0]


def test_low_precision_logits_are_accepted():
    torch.manual_seed(0)
    logits = torch.randn(4, 50).to(torch.bfloat16)
    out = _sample(logits, [SamplingParams(temperature=0.8, top_k=5) for _ in range(4)])
    assert out.dtype == torch.long and ((out >= 0) & (out < 50)).all()


@pytest.mark.parametrize("temperature", [0.01, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy_at_any_temperature(temperature):
    torch.manual_seed(1)
    logits = torch.randn(16, 64)
    logits[0, :] = 2.0  # an all-tie row: top_k=1 must also pick index 0, like argmax
    out = _sample(logits, [SamplingParams(temperature=temperature, top_k=1) for _ in range(16)])
    assert torch.equal(out, logits.argmax(-1))


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(16, 64)
    out = _sample(logits, [SamplingParams(temperature=3.0, top_p=1e-6) for _ in range(16)])
    assert torch.equal(out, logits.argmax(-1))


def test_tiny_temperature_does_not_produce_nan():
    logits = torch.tensor([[1.0, 1000.0, -1000.0, 999.0]])
    out = _sample(logits, [SamplingParams(temperature=1e-30)])
    assert out.tolist() == [1]


# ---------------------------------------------------------------- support of the filters


def test_top_k_restricts_support():
    torch.manual_seed(3)
    row = torch.randn(10).tolist()
    top3 = set(torch.tensor(row).topk(3).indices.tolist())
    logits, params = _repeat(row, 3000, temperature=5.0, top_k=3)  # hot: flat over the 3
    seen = set(_sample(logits, params).tolist())
    assert seen == top3


def test_top_p_restricts_support_and_renormalises():
    probs = [0.05, 0.5, 0.15, 0.3]  # ranked: id 1 (0.5), id 3 (0.3), id 2 (0.15), id 0 (0.05)
    row = [math.log(p) for p in probs]
    n = 20000

    # Smallest set reaching 0.75 is {1, 3} (0.5 < 0.75 <= 0.8).
    logits, params = _repeat(row, n, temperature=1.0, top_p=0.75)
    counts = torch.bincount(_sample(logits, params), minlength=4).float() / n
    assert counts[0] == 0 and counts[2] == 0
    # Renormalised: 0.5/0.8 = 0.625. Std of a frequency over n draws <= 0.5/sqrt(n) = 0.0035;
    # 0.02 is over 5 sigma.
    assert abs(counts[1].item() - 0.625) < 0.02

    # Reaching 0.85 needs the third token too: {1, 3, 2}; id 0 never appears.
    logits, params = _repeat(row, n, temperature=1.0, top_p=0.85)
    counts = torch.bincount(_sample(logits, params), minlength=4)
    assert counts[0] == 0 and (counts[1:] > 0).all()


def test_top_k_then_top_p_combine():
    row = [math.log(p) for p in [0.4, 0.3, 0.2, 0.1]]
    # top_k=3 renormalises to 0.444/0.333/0.222; top_p=0.7 then keeps {0, 1} (0.444 < 0.7).
    logits, params = _repeat(row, 4000, temperature=1.0, top_k=3, top_p=0.7)
    assert set(_sample(logits, params).tolist()) == {0, 1}


def test_masked_logits_are_never_sampled():
    row = [0.0, -math.inf, 0.0, -math.inf]
    logits, params = _repeat(row, 2000, temperature=1.0)
    assert set(_sample(logits, params).tolist()) == {0, 2}


# ---------------------------------------------------------------- distribution


def _softmax(row: list[float], temperature: float) -> torch.Tensor:
    return torch.softmax(torch.tensor(row) / temperature, dim=-1)


def test_frequencies_match_softmax_over_temperature():
    torch.manual_seed(4)
    row, temperature, n = [1.0, 0.5, 0.0, -1.0], 0.7, 20000
    logits, params = _repeat(row, n, temperature=temperature)
    freq = torch.bincount(_sample(logits, params), minlength=4).float() / n
    # Each frequency has std <= 0.5/sqrt(20000) ~ 0.0035; allow 0.015 (over 4 sigma).
    assert torch.allclose(freq, _softmax(row, temperature), atol=0.015), freq


def test_seeded_draws_follow_the_same_distribution():
    row, temperature, n = [1.0, 0.5, 0.0, -1.0], 1.3, 4000
    logits = torch.tensor([row])
    g = make_generator(1234)
    params = [SamplingParams(temperature=temperature)]
    draws = torch.tensor([sampler(logits, params, [g]).item() for _ in range(n)])
    freq = torch.bincount(draws, minlength=4).float() / n
    # std <= 0.5/sqrt(4000) ~ 0.008; allow 0.035 (over 4 sigma).
    assert torch.allclose(freq, _softmax(row, temperature), atol=0.035), freq


# ---------------------------------------------------------------- seeds


def _run_steps(rows: list[tuple[torch.Tensor, SamplingParams]], steps: int = 20) -> list[list[int]]:
    """Decode `steps` tokens for each row (fixed logits per row); one generator per row
    for the whole run, as the engine keeps one per request."""
    logits = torch.stack([r for r, _ in rows])
    params = [p for _, p in rows]
    gens = [make_generator(p.seed) for p in params]
    out = [sampler(logits, params, gens).tolist() for _ in range(steps)]
    return [list(col) for col in zip(*out)]


def test_seeded_rows_reproduce_and_ignore_the_rest_of_the_batch():
    torch.manual_seed(5)
    vocab = 200
    a = (torch.randn(vocab), SamplingParams(temperature=1.0, seed=11))
    b = (torch.randn(vocab), SamplingParams(temperature=0.7, top_p=0.9, seed=22))
    c = (torch.randn(vocab), SamplingParams(temperature=1.5, top_k=50, seed=11))

    def others(n: int):
        return [(torch.randn(vocab), SamplingParams(temperature=1.0)) for _ in range(n)]

    alone_a = _run_steps([a])[0]
    alone_b = _run_steps([b])[0]
    alone_c = _run_steps([c])[0]
    assert _run_steps([a])[0] == alone_a  # same seed, same logits => same tokens
    assert len(set(alone_a)) > 1  # and it really samples

    mixed = _run_steps([a, *others(3), b, (torch.randn(vocab), SamplingParams()), c])
    assert mixed[0] == alone_a and mixed[4] == alone_b and mixed[6] == alone_c

    reordered = _run_steps([c, b, *others(2), a])
    assert reordered[0] == alone_c and reordered[1] == alone_b and reordered[4] == alone_a


def test_different_seeds_differ():
    torch.manual_seed(6)
    row = torch.randn(500)
    one = _run_steps([(row, SamplingParams(temperature=1.0, seed=1))])[0]
    two = _run_steps([(row, SamplingParams(temperature=1.0, seed=2))])[0]
    assert one != two


def test_make_generator():
    assert make_generator(None) is None
    g = make_generator(7)
    assert isinstance(g, torch.Generator) and g.initial_seed() == 7


def test_batch_size_mismatch_is_rejected():
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 5), [SamplingParams()], [None, None])


# ---------------------------------------------------------------- validation


def test_defaults_and_good_values_validate():
    SamplingParams().validate()
    SamplingParams(
        max_new_tokens=1, temperature=2, top_p=1, top_k=40, seed=2**63 - 1,
        stop=tuple(str(i) for i in range(16)), ignore_eos=True,
    ).validate()


def test_stop_list_is_converted_to_tuple():
    params = SamplingParams(stop=["a", "b"])
    assert params.stop == ("a", "b")
    params.validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature must be finite"),
        ({"temperature": math.inf}, "temperature must be finite"),
        ({"temperature": "1"}, "temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": math.nan}, "top_p must be finite"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_k": 1.5}, "top_k must be an integer"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": True}, "seed must be an integer"),
        ({"stop": ("ok", "")}, r"stop\[1\] must not be an empty string"),
        ({"stop": ("ok", 3)}, r"stop\[1\] must be a string"),
        ({"stop": "abc"}, "stop must be a tuple of strings"),
        ({"stop": tuple("x" * (i + 1) for i in range(17))}, "at most 16 stop strings"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
    ],
)
def test_validate_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


@pytest.mark.parametrize("width", [49152, 320, 512, 256, 100, 7])
def test_row_argmax_is_argmax_with_its_ties(width):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(6, width, generator=gen)
    x[1] = 0.0  # every entry tied: index 0
    x[2, width // 3] = x[2, width - 1] = 50.0  # a tie across blocks: the lower index
    x[3, 1] = x[3, 2] = 60.0  # a tie inside a block
    x[4] = float("-inf")
    x[5, width // 2] = float("nan")  # argmax takes a NaN as the largest
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
