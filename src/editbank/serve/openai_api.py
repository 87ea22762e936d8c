"""The OpenAI-compatible part of the service: request bodies, and responses or server-sent event streams.

`/v1/completions` and `/v1/chat/completions` take what the official `openai` client sends: `n` (more than one
choice per prompt, sampled when `temperature` > 0), `stream` (server-sent events in OpenAI's chunk format, ending
with `data: [DONE]`; `stream_options.include_usage` adds the usage chunk), `logprobs` (completions: the log
probability of each generated token and up to 5 alternatives, from the edited model's raw next-token logits),
`stop`, `seed`, `top_p`, and the usage block. A chat request is turned into one prompt by the tokenizer's chat
template where it has one; otherwise by the plain template: the messages' contents joined by newlines, so a base
model continues the conversation as text.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .batcher import Job, Result

Text = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Short = Annotated[str, StringConstraints(min_length=1, max_length=1000)]
Stops = Short | Annotated[list[Short], Field(max_length=4)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(None, ge=1, le=256)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stops = None
    seed: int | None = None
    model: str | None = None  # accepted for OpenAI clients; there is one model
    user: str | None = None  # accepted and ignored
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def job(self, prompts: list[str], max_tokens: int, logprobs: int | None = None, stream: bool = False) -> Job:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Job(prompts=[p for p in prompts for _ in range(self.n)], max_tokens=max_tokens,
                   temperature=self.temperature, top_p=self.top_p, seed=self.seed, stops=stops,
                   logprobs=logprobs, n=self.n, events=queue.Queue() if stream else None)


class CompletionIn(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=32)]
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int = Field(16, ge=1, le=256)

    @model_validator(mode="after")
    def _fits(self):
        if self.stream and self.logprobs is not None:
            raise ValueError("logprobs are not streamed: ask without stream")
        if len(self.prompts()) * self.n > 64:
            raise ValueError("at most 64 choices per request (prompts x n)")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=4000)]
    name: str | None = None


class ChatIn(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=64)]
    max_completion_tokens: int | None = Field(None, ge=1, le=256)

    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


def chat_prompt(tokenizer, messages: list[Message]) -> str:
    """The prompt of a chat: the tokenizer's chat template, else the contents joined by newlines."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "\n".join(t["content"] for t in turns)


def _usage(result: Result) -> dict[str, int]:
    p, c = result.prompt_tokens, result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _head(kind: str, name: str) -> dict[str, Any]:
    prefix, obj = ("cmpl", "text_completion") if kind == "completion" else ("chatcmpl", "chat.completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()), "model": name}


def completion_json(result: Result, name: str) -> dict[str, Any]:
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": c.logprobs}
               for i, c in enumerate(result.choices)]
    return {**_head("completion", name), "choices": choices, "usage": _usage(result)}


def chat_json(result: Result, name: str) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None} for i, c in enumerate(result.choices)]
    return {**_head("chat", name), "choices": choices, "usage": _usage(result)}


def sse(job: Job, first: tuple, kind: str, name: str, include_usage: bool) -> Iterator[str]:
    """The event stream of a job whose first event (`first`) has arrived: chunks, usage, [DONE]."""
    head = _head(kind, name)
    if kind == "chat":
        head["object"] = "chat.completion.chunk"
        for i in range(len(job.prompts)):
            yield _data({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None, "logprobs": None}]})
    event: tuple | None = first
    while event is not None:
        i, delta, finish = event
        if kind == "chat":
            choice = {"index": i, "delta": {"content": delta} if delta else {}, "finish_reason": finish,
                      "logprobs": None}
        else:
            choice = {"index": i, "text": delta, "finish_reason": finish, "logprobs": None}
        yield _data({**head, "choices": [choice]})
        event = job.events.get()
    result = job.future.result()  # an error after the first token ends the stream without [DONE]
    if include_usage:
        yield _data({**head, "choices": [], "usage": _usage(result)})
    yield "data: [DONE]\n\n"


def _data(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
