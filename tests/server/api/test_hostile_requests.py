"""Hostile or unlucky calls through a real server, each answered precisely while others are served:
prompts far beyond the context, a stream past its deadline (counted as such, not as a cancel),
and an adapter whose files were missing at start-up, served again once they are restored."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loraplex.clients.client import Client, LoraplexError

MIB = 1 << 20
LONG = 1000  # tokens, on `long_model`: streaming long after the test has acted


def _refused(call, *args, **kwargs) -> LoraplexError:
    with pytest.raises(LoraplexError) as info:
        call(*args, **kwargs)
    return info.value


# ----------------------------------------------------------------------------- huge prompts

HUGE = {  # case -> (generate kwargs, message fragment)
    "1 MiB prompt": (dict(prompt="a" * MIB),
                     "the prompt has 1048576 characters, beyond the model's context of 256 tokens (255 for the "
                     "prompt, 1 for a new token): 255 tokens hold at most 1275 characters, 5 a token"),
    "over the server's cap": (dict(prompt="a" * (MIB + 1)),
                              "the prompt has 1048577 characters, more than the server's limit of 1048576"),
    "long chat": (dict(messages=[{"role": "user", "content": "the quick brown fox " * 50}] * 40),
                  "the chat (its template applied) has "),
    "chat of too many turns": (dict(messages=[{"role": "user", "content": "hi"}] * 2049),
                               "the chat has 2049 messages, more than the server's limit of 2048"),
    "chat over the server's cap": (dict(messages=[{"role": "user", "content": "a" * (MIB // 2)}] * 2),
                                   "the chat's roles and contents have 1048584 characters, more than the server's "
                                   "limit of 1048576"),
    "too many tokens": (dict(prompt="a" * 1200), "the prompt is longer than 255 tokens (its first 1020 characters"),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_a_huge_prompt_is_refused_with_its_size_and_the_limit(module_server_factory, case):
    server = module_server_factory(name="huge")
    kwargs, fragment = HUGE[case]
    with Client(server.target, timeout=60) as client:
        err = _refused(client.generate, max_new_tokens=4, **kwargs)
    assert err.code == "INVALID_ARGUMENT", (case, err)
    assert fragment in err.message, (case, err.message)


def test_eight_1_mib_prompts_leave_a_normal_request_served(module_server_factory):
    """Eight callers of 1 MiB prompts at once: each is refused, and a normal request beside them
    gets its tokens (before the fix each was tokenized whole, about 2 s of CPU apiece)."""
    server = module_server_factory(name="huge")
    with Client(server.target, timeout=60) as client:
        expected = client.generate("hello world", max_new_tokens=6, ignore_eos=True).token_ids
        with ThreadPoolExecutor(9) as pool:
            huge = [pool.submit(_refused, client.generate, "a" * MIB, max_new_tokens=4) for _ in range(8)]
            normal = pool.submit(client.generate, "hello world", max_new_tokens=6, ignore_eos=True)
            errors = [f.result() for f in huge]
            assert normal.result().token_ids == expected
    assert {e.code for e in errors} == {"INVALID_ARGUMENT"}
    assert all("1048576 characters, beyond the model's context of 256" in e.message for e in errors)


# ----------------------------------------------------------------------------- deadline or cancel


@pytest.fixture(scope="module")
def long_server(module_server_factory, long_model):
    return module_server_factory(name="long", model=long_model)


def _ended(api, server) -> tuple[float, float]:
    text = api.scrape(server)
    return (api.metric(text, "loraplex_requests_total", status="deadline_exceeded"),
            api.metric(text, "loraplex_requests_total", status="cancelled"))


def _past_deadline(server, rpc: str) -> None:
    with Client(server.target, timeout=60) as client:
        if rpc == "generate":
            err = _refused(client.generate, "the quick brown fox", max_new_tokens=LONG, ignore_eos=True, timeout=0.5)
        else:
            events = []
            with pytest.raises(LoraplexError) as info:
                for e in client.stream("the quick brown fox", max_new_tokens=LONG, ignore_eos=True, timeout=0.5):
                    events.append(e)
            err = info.value
            assert events and not any(e.is_final for e in events)  # it was generating when the deadline came
    assert err.code == "DEADLINE_EXCEEDED", err


def _cancel(server) -> None:
    with Client(server.target, timeout=60) as client:
        stream = client.stream("the quick brown fox", max_new_tokens=LONG, ignore_eos=True)
        assert not next(stream).is_final
        stream.close()  # the client cancels the call


@pytest.mark.parametrize("rpc", ["generate", "stream"])
def test_a_call_past_its_deadline_counts_as_deadline_exceeded(long_server, api, rpc):
    deadline, cancelled = _ended(api, long_server)
    _past_deadline(long_server, rpc)
    api.wait_until(lambda: _ended(api, long_server)[0] == deadline + 1, what="the request counted as deadline_exceeded")
    time.sleep(0.2)  # nothing else is counted for it
    assert _ended(api, long_server) == (deadline + 1, cancelled)


def test_a_cancelled_call_still_counts_as_cancelled(long_server, api):
    deadline, cancelled = _ended(api, long_server)
    _cancel(long_server)
    api.wait_until(lambda: _ended(api, long_server)[1] == cancelled + 1, what="the request counted as cancelled")
    time.sleep(0.2)
    assert _ended(api, long_server) == (deadline, cancelled + 1)
    text = api.scrape(long_server)
    assert api.metric(text, "loraplex_running_requests") == 0  # both kinds free the request


# ----------------------------------------------------------------------------- blob restored


def test_an_adapter_whose_blob_comes_back_is_served_again(server_factory, tiny_adapters, tmp_path, api):
    store = tmp_path / "store"
    first = server_factory(store=store, name="before")
    with Client(first.target, timeout=60) as client:
        digest = client.upload_adapter("task", tiny_adapters["attn4"])["digest"]
        before = client.generate("the quick brown fox", adapter="task", max_new_tokens=8, ignore_eos=True).token_ids
    assert first.terminate() == 0, first.output()
    blob, away = store / "blobs" / digest, tmp_path / "moved-away"
    assert blob.is_dir()
    shutil.move(blob, away)

    second = server_factory(store=store, name="missing")
    with Client(second.target, timeout=60) as client:
        for _ in range(5):  # a flood while the files are away: each refused at once, precisely
            err = _refused(client.generate, "the quick brown fox", adapter="task", max_new_tokens=8)
            assert err.code == "FAILED_PRECONDITION", err
            assert "task@1 is registered but not servable on the served base model" in err.message, err.message
        assert len(client.generate("hello world", max_new_tokens=3, ignore_eos=True).token_ids) == 3
        shutil.move(away, blob)

        def served():
            try:
                return client.generate("the quick brown fox", adapter="task", max_new_tokens=8, ignore_eos=True)
            except LoraplexError as exc:
                assert exc.code == "FAILED_PRECONDITION", exc
                return None

        after = api.wait_until(served, timeout=30, interval=0.2, what="task@1 served again")
        assert after.token_ids == before and after.adapter == "task@1"
    log = second.output()
    assert log.count("stored adapter task@1 is not servable") == 1, log  # reported once, not per request
    assert "adapter task@1 is servable again" in log and "Traceback" not in log, log
