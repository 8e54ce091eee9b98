"""`loraplex generate` as a real subprocess on the tiny model: JSON lines in input order, results
equal to `Engine.generate` in-process, per-line errors that leave the other lines alone, adapters
refused at startup with their reason, and usage errors (exit status 2).

Each subprocess pays a few seconds of imports, so the cases are batched into few invocations.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

TIMEOUT = 120


def cli(args: list, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run `loraplex generate ARGS` in `cwd`; stdout and stderr as str (UTF-8, newlines untouched)."""
    proc = subprocess.run([sys.executable, "-m", "loraplex.clients.cli", "generate", *map(str, args)],
                          cwd=cwd, input=stdin, capture_output=True, timeout=TIMEOUT)
    proc.stdout = proc.stdout.decode("utf-8")
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    return proc


def json_lines(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    return [json.loads(line) for line in lines]  # every stdout line is one JSON object


def as_result(c) -> dict:
    return {"error": c.error} if c.error else {"text": c.text, "token_ids": c.token_ids,
                                               "finish_reason": c.finish_reason}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, tiny_model, tiny_adapters, builders) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-adapters")

    # PEFT's legacy pickle format: a config and adapter_model.bin whose unpickling would
    # create a marker file
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_adapters["attn4"] / "adapter_config.json", pickled)
    marker = root / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))

    # a real adapter, for a model of another hidden size
    small = builders.llama(root / "small-model", hidden_size=32)
    wrong = builders.lora(small, root / "wrongshape", ["q_proj", "v_proj"], r=4, alpha=8, seed=9)

    truncated = root / "truncated"
    shutil.copytree(tiny_adapters["attn4"], truncated)
    weights = truncated / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return {"pickled": pickled, "wrongshape": wrong, "truncated": truncated, "marker": marker}


def _pick_stop(text: str, min_start: int = 3) -> str:
    for start in range(min_start, len(text) - 1):
        s = text[start:start + 2]
        if "\ufffd" not in s and s.strip() and text.find(s) == start:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


GOOD_LINES = {  # physical line number -> request fields
    1: {"prompt": "the quick brown fox"},
    2: {"prompt": "hello world", "adapter": "attn4", "max_new_tokens": 9},
    3: {"prompt": "SELECT name", "soft_prompt": "soft", "max_new_tokens": 5},
    4: {"prompt": "translate to French", "adapter": "mlp8", "soft_prompt": "soft", "max_new_tokens": 7},
    5: {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "adapter": "rs2"},
    6: {"prompt": "hello", "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 3, "max_new_tokens": 8},
    7: None,  # the stop-string line, filled in once the stop is known
    18: {"prompt": "hello world", "max_new_tokens": 4},
}
DEFAULT_NEW = 6  # --max-new-tokens


def _request(fields: dict) -> Request:
    sampling = {k: fields[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed") if k in fields}
    sampling.setdefault("max_new_tokens", DEFAULT_NEW)
    stop = fields.get("stop")
    if stop is not None:
        sampling["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return Request(prompt=fields.get("prompt"), messages=fields.get("messages"), adapter=fields.get("adapter"),
                   soft_prompt=fields.get("soft_prompt"), params=SamplingParams(**sampling))


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, tiny_model, tiny_adapters, bad_adapters):
    """One invocation: good lines of every kind, per-line errors, refused adapters."""
    engine = Engine(EngineConfig(model=str(tiny_model), max_lora_rank=8))
    for name in ("attn4", "mlp8", "rs2", "soft"):
        engine.register_adapter(name, str(tiny_adapters[name]))
    [probe] = engine.generate([Request(prompt="the quick brown fox", adapter="attn4",
                                       params=SamplingParams(max_new_tokens=20, ignore_eos=True))])
    stop = _pick_stop(probe.text)
    good = dict(GOOD_LINES)
    good[7] = {"prompt": "the quick brown fox", "adapter": "attn4", "max_new_tokens": 20, "stop": stop,
               "temperature": 0}
    lines = {n: json.dumps(f) for n, f in good.items()}
    lines.update({
        8: json.dumps({"prompt": "hello", "adapter": "nope"}),
        9: "",  # blank: skipped, but line numbers stay physical
        10: '{"prompt": "hello",',
        11: json.dumps({"prompt": "hi", "colour": "red"}),
        12: json.dumps({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}),
        13: json.dumps({"prompt": "hi", "temperature": -1}),
        14: json.dumps({"prompt": "hi", "adapter": "pickled"}),
        15: json.dumps({"prompt": "hi", "adapter": "wrongshape"}),
        16: json.dumps({"prompt": "hi", "adapter": "all16"}),
        17: json.dumps({"prompt": "hi", "adapter": "truncated"}),
        19: json.dumps({"prompt": "hi", "soft_prompt": "spl"}),
        20: json.dumps({"prompt": "hi", "adapter": "spl"}),
    })
    work = tmp_path_factory.mktemp("cli-main")
    (work / "in.jsonl").write_text("\n".join(lines[n] for n in range(1, 21)) + "\n", encoding="utf-8")
    args = ["--model", tiny_model, "--input", "in.jsonl", "--json", "--max-new-tokens", DEFAULT_NEW,
            "--max-lora-rank", 8,
            "--adapter", f"attn4={tiny_adapters['attn4']}", "--adapter", f"mlp8={tiny_adapters['mlp8']}",
            "--adapter", f"rs2={tiny_adapters['rs2']}", "--soft-prompt", f"soft={tiny_adapters['soft']}",
            "--adapter", f"pickled={bad_adapters['pickled']}", "--adapter", f"wrongshape={bad_adapters['wrongshape']}",
            "--adapter", f"all16={tiny_adapters['all16']}", "--adapter", f"truncated={bad_adapters['truncated']}",
            "--soft-prompt", f"spl={tiny_adapters['attn4']}"]  # a LoRA named as a soft prompt
    proc = cli(args, work)
    order = sorted(good)
    expected = dict(zip(order, engine.generate([_request(good[n]) for n in order])))
    return proc, expected, good, probe, stop


# ----------------------------------------------------------------------------- the main invocation


def _by_line(proc) -> dict[int, dict]:
    results = json_lines(proc.stdout)
    physical = [n for n in range(1, 21) if n != 9]  # the blank line gets no output
    assert len(results) == len(physical), proc.stdout + proc.stderr
    return dict(zip(physical, results))


def test_good_lines_equal_in_process_generate(main_run):
    proc, expected, good, _, _ = main_run
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1  # some lines failed
    got = _by_line(proc)
    for n, completion in expected.items():
        assert completion.error is None, (n, completion.error)
        assert set(got[n]) == {"text", "token_ids", "finish_reason"}, (n, got[n])
        assert got[n] == as_result(completion), (n, good[n])
    # the per-line and default lengths were honoured
    assert len(got[1]["token_ids"]) <= DEFAULT_NEW and len(got[2]["token_ids"]) <= 9
    assert got[1]["finish_reason"] in ("length", "eos")


def test_stop_line_stops(main_run):
    proc, expected, _, probe, stop = main_run
    line = _by_line(proc)[7]
    assert line["finish_reason"] == "stop"
    assert line["text"] == probe.text[: probe.text.find(stop)]
    assert line["token_ids"] == probe.token_ids[: len(line["token_ids"])]


def test_per_line_errors(main_run):
    proc, *_ = main_run
    got = _by_line(proc)
    errors = {n: r for n, r in got.items() if "error" in r}
    assert set(errors) == {8, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20}
    for r in errors.values():
        assert set(r) == {"error"}
    assert "unknown LoRA adapter 'nope'" in errors[8]["error"]
    assert errors[10]["error"].startswith("line 10:") and "JSON" in errors[10]["error"]
    assert errors[11]["error"].startswith("line 11:") and "colour" in errors[11]["error"]
    assert errors[12]["error"].startswith("line 12:") and "exactly one" in errors[12]["error"]
    assert errors[13]["error"].startswith("line 13:") and "temperature" in errors[13]["error"]


REFUSED = {  # adapter name -> a fragment of the reason
    "pickled": "never unpickled",
    "wrongshape": "lora_A has shape [4, 32] but the base layer needs [4, 64]",
    "all16": "rank 16 exceeds the server's --max-lora-rank 8",
    "truncated": "truncated",
    "spl": "not a soft prompt",
}
REFUSED_LINES = {14: "pickled", 15: "wrongshape", 16: "all16", 17: "truncated", 19: "spl"}


def test_refused_adapters_are_named_on_stderr_and_in_their_lines(main_run, bad_adapters):
    proc, *_ = main_run
    stderr_lines = proc.stderr.splitlines()
    for name, reason in REFUSED.items():
        mine = [line for line in stderr_lines if line.startswith(f"error: adapter {name!r} refused:")]
        assert len(mine) == 1, (name, proc.stderr)
        assert reason in mine[0], (name, mine[0])
    got = _by_line(proc)
    for n, name in REFUSED_LINES.items():
        error = got[n]["error"]
        assert f"adapter {name!r} was refused at startup" in error, (n, error)
        assert REFUSED[name] in error, (n, error)
    assert "adapter_model.bin" in got[14]["error"]
    assert not bad_adapters["marker"].exists(), "the pickled weights were unpickled"
    # good adapters are not reported
    for name in ("attn4", "mlp8", "rs2", "soft"):
        assert f"adapter {name!r}" not in proc.stderr


def test_lora_refused_as_soft_prompt_is_not_served_as_adapter(main_run):
    proc, *_ = main_run
    line = _by_line(proc)[20]
    assert "error" in line and "adapter 'spl' was refused at startup" in line["error"], line


# ----------------------------------------------------------------------------- other modes


def test_stdin_input_and_exit_zero(tmp_path, tiny_model, tiny_adapters):
    requests = [{"prompt": "hello world", "adapter": "attn4"},
                {"messages": [{"role": "user", "content": "SELECT name"}], "soft_prompt": "soft",
                 "max_new_tokens": 3}]
    stdin = ("\n".join(json.dumps(r) for r in requests) + "\n").encode()
    proc = cli(["--model", tiny_model, "--input", "-", "--json", "--max-new-tokens", 5,
                "--adapter", f"attn4={tiny_adapters['attn4']}", "--adapter", f"soft={tiny_adapters['soft']}"],
               tmp_path, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    engine = Engine(EngineConfig(model=str(tiny_model)))
    engine.register_adapter("attn4", str(tiny_adapters["attn4"]))
    engine.register_adapter("soft", str(tiny_adapters["soft"]))
    expected = engine.generate([_request({**r, "max_new_tokens": r.get("max_new_tokens", 5)}) for r in requests])
    assert json_lines(proc.stdout) == [as_result(c) for c in expected]


def test_single_prompt_prints_text(tmp_path, tiny_model, tiny_adapters):
    proc = cli(["--model", tiny_model, "--prompt", "hello world", "--max-new-tokens", 5,
                "--adapter", f"mlp8={tiny_adapters['mlp8']}", "--adapter-name", "mlp8"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    engine = Engine(EngineConfig(model=str(tiny_model)))
    engine.register_adapter("mlp8", str(tiny_adapters["mlp8"]))
    [expected] = engine.generate([Request(prompt="hello world", adapter="mlp8",
                                          params=SamplingParams(max_new_tokens=5))])
    assert proc.stdout == expected.text + "\n"


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("case", ["missing-input", "empty-input", "adapter-without-equals", "no-model"])
def test_usage_errors_exit_2(tmp_path, tiny_model, tiny_adapters, case):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n', encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text("\n   \n\n", encoding="utf-8")
    args, fragment = {
        "missing-input": (["--model", tiny_model, "--input", "nothere.jsonl"], "cannot read --input"),
        "empty-input": (["--model", tiny_model, "--input", "blank.jsonl"], "no requests in the input"),
        "adapter-without-equals": (["--model", tiny_model, "--input", "in.jsonl", "--adapter", str(tiny_adapters["attn4"])],
                                   "expected NAME=DIR"),
        "no-model": (["--model", tmp_path / "no-such-model", "--input", "in.jsonl"], "does not exist"),
    }[case]
    proc = cli(args, tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_input_not_utf8_is_a_usage_error(tmp_path, tiny_model):
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    proc = cli(["--model", tiny_model, "--input", "latin1.jsonl", "--json"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr

