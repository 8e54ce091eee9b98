"""From an example to what the model sees: the prompt (text or chat turns) and its token ids.

Training and serving must build prompts the same way, so the ids here are made exactly as the
engine makes them (`intake.py`, `Intake.prompt_ids`): a text prompt through ``tokenizer(text)``, a chat
through the tokenizer's chat template with the generation prompt added, tokenized without
special tokens. The answer follows as its own tokens and the end-of-sequence token.

In chat format the rendered instruction is the user turn (serve it by sending chat messages to
the endpoint, whose template wraps the last user turn); in plain format it is the whole prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import Example
from .templates import Template, render

IGNORE = -100  # label of a position the loss skips


@dataclass(frozen=True)
class PromptFormat:
    template: Template
    chat: bool

    def text(self, ex: Example, phrasing: str | None = None) -> str:
        """The prompt text of an instruction or prompt row (`phrasing`: default the served one)."""
        if ex.instruction is not None:
            return render(phrasing or self.template.served, ex.instruction, ex.input)
        if ex.prompt is not None:
            return ex.prompt
        raise ValueError("a chat row has no single prompt text")

    def request(self, ex: Example, phrasing: str | None = None, shots: list[Example] = ()) -> dict:
        """The engine request's input: {"prompt": str} or {"messages": [...]}, with `shots`
        (solved examples) in front as in-context demonstrations."""
        if ex.messages is not None and not self.chat:
            raise ValueError("chat rows need the chat format (a tokenizer with a chat template)")
        if not self.chat:
            demos = "".join(f"{self.text(s)}\n{s.answer}\n\n" for s in shots)
            return {"prompt": demos + self.text(ex, phrasing)}
        messages = []
        for s in shots:
            messages += self.turns(s) + [{"role": "assistant", "content": s.answer}]
        return {"messages": messages + self.turns(ex, phrasing)}

    def turns(self, ex: Example, phrasing: str | None = None) -> list[dict]:
        if ex.messages is not None:
            return [{"role": r, "content": c} for r, c in ex.messages]
        return [{"role": "user", "content": self.text(ex, phrasing)}]

    def prompt_ids(self, tokenizer, ex: Example, phrasing: str | None = None) -> list[int]:
        req = self.request(ex, phrasing)
        if "prompt" in req:
            return list(tokenizer(req["prompt"])["input_ids"])
        text = tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, tokenizer, ex: Example, phrasing: str | None, max_length: int) -> dict | None:
        """{"input_ids", "labels"} with the prompt's labels masked; None when the prompt leaves
        no room for any answer token within `max_length`."""
        prompt = self.prompt_ids(tokenizer, ex, phrasing)
        answer = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        if len(ids) <= len(prompt):
            return None
        return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt):]}


def default_chat(tokenizer) -> bool:
    """Chat format when the tokenizer has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))
