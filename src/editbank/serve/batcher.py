"""Dynamic batching of completions: requests that wait at the same time share one `generate` call.

One worker thread owns the model's forward passes and the tokenizer. It takes the oldest waiting job, adds every
waiting job that can share its decoding (greedy with greedy; sampling at the same temperature and top_p; a seeded
sampling job always runs alone, so its seed means what it says), up to `max_batch` rows and `max_batch_tokens`
padded tokens, and runs them as one left-padded batch in which each row is routed on its own. A job is answered as
soon as its rows have finished, and the batch ends when all have. Jobs that arrive while a batch runs form the next
one, so an idle server adds no delay and a busy one batches by itself.

Each row's text is produced by a `RowText` as its tokens arrive: it cuts at the stop sequences and holds back text
that could still become one, so the deltas a streaming client receives join up to the text a non-streaming one gets.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..editor import _max_positions
from ..tokens import prompt_ids


@dataclass
class Choice:
    text: str
    tokens: list[int]
    finish_reason: str
    logprobs: dict[str, Any] | None = None


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int  # of the job's distinct prompts (n > 1 counts a prompt once, as OpenAI does)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


@dataclass
class Job:
    """One request's generation: `prompts` (one per choice; n > 1 repeats a prompt) and how to decode them."""

    prompts: list[str]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token (0-5), or None for no logprobs
    n: int = 1  # choices per distinct prompt: `prompts` holds each distinct prompt n times in a row
    events: queue.Queue | None = None  # streaming: gets (choice index, text delta, finish reason or None), then None
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # its request gave up waiting (503): dropped before it runs

    def key(self) -> tuple:
        lp = self.logprobs is not None  # a logprobs job keeps every step's logits: never make others pay for it
        if self.temperature == 0:
            return ("greedy", lp)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p, lp)

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {}
        return {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": self.top_p}


class RowText:
    """The text of one generated row, built token by token, cut at the first stop sequence."""

    def __init__(self, tokenizer, stops: list[str], max_tokens: int, lazy: bool = False) -> None:
        self.tok, self.stops, self.max_tokens = tokenizer, stops, max_tokens
        self.lazy = lazy and not stops  # nobody reads the text before the end: decode once, at close
        self.tokens: list[int] = []
        self.text, self.sent, self.finish = "", 0, None

    def add(self, token: int) -> str:
        """Take the next token; return the text that is now final (may be empty)."""
        if self.finish is not None:
            return ""
        self.tokens.append(token)
        if self.lazy:
            if len(self.tokens) >= self.max_tokens:
                return self.close()
            return ""
        self.text = self.tok.decode(self.tokens, skip_special_tokens=True)
        hits = [self.text.index(s) for s in self.stops if s in self.text]
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish = "length"
        return self._release()

    def close(self) -> str:
        """The row ended (eos, or the batch's last step): release what was held back."""
        if self.finish is None or self.lazy:
            if self.lazy:
                self.text, self.lazy = self.tok.decode(self.tokens, skip_special_tokens=True), False
            if self.finish is None:
                self.finish = "stop" if len(self.tokens) < self.max_tokens else "length"
        return self._release()

    def _release(self) -> str:
        end = len(self.text)
        if self.finish is None:
            while end and self.text[end - 1] == "\ufffd":  # a character split over tokens: wait for the rest
                end -= 1
            for s in self.stops:  # the longest tail that could still grow into a stop sequence
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end -= k
                        break
        delta, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return delta


class _Fanout:
    """A transformers streamer that hands each row's new token to its RowText and streams the deltas; `done(job)`
    is called once for each job whose rows have all finished (stop sequence, eos or its own max_tokens) while the
    batch goes on."""

    def __init__(self, rows: list[tuple[Job, int, RowText]], eos: int | None, done=None) -> None:
        self.rows, self.eos, self.prompt_seen, self.done = rows, eos, False, done
        self.waiting: dict[int, tuple[Job, list[RowText]]] = {}
        for job, _, text in rows:
            self.waiting.setdefault(id(job), (job, []))[1].append(text)
        self.put_steps = self.taken = 0  # generation steps handed to `put`; steps whose tokens were taken

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt batch
            self.prompt_seen = True
            return
        self.put_steps += 1
        self.take(self.put_steps, value.view(-1).tolist())

    def take(self, step: int, tokens: list[int]) -> None:
        """Hand generation step `step`'s tokens to the rows, once: the stopping criterion and `put` both call it,
        in an order that depends on the transformers version."""
        if step <= self.taken:
            return
        self.taken = step
        for (job, i, text), token in zip(self.rows, tokens):
            if text.finish is not None:
                continue
            if self.eos is not None and token == self.eos:
                delta = text.close()
            else:
                delta = text.add(token)
            if job.events is not None and (delta or text.finish is not None):
                job.events.put((i, delta, text.finish))
        for key, (job, texts) in list(self.waiting.items()):
            if all(t.finish is not None for t in texts):
                del self.waiting[key]
                if self.done is not None:
                    self.done(job)

    def finished(self) -> list[bool]:
        """Per row: has it finished (a per-row stopping criterion: the batch ends when every row has)?"""
        return [text.finish is not None for _, _, text in self.rows]

    def end(self) -> None:
        for job, i, text in self.rows:
            if text.finish is None:
                delta = text.close()
                if job.events is not None:
                    job.events.put((i, delta, text.finish))


class Batcher:
    """The worker that runs every completion; `submit` a Job and wait on its `future`."""

    def __init__(self, editor, guard, max_batch: int = 32, max_batch_tokens: int = 16384, metrics=None,
                 gather: float = 0.5) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.editor, self.guard, self.metrics = editor, guard, metrics
        self.max_batch, self.max_batch_tokens, self.gather = max_batch, max_batch_tokens, gather
        self._recent: deque[tuple[int, float]] = deque(maxlen=16)  # (rows, seconds) of the last batches
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # taken from the queue but not batched yet (kept in arrival order)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="editbank-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self._queue.put(job)
        self._depth()
        return job.future

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)

    # -- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self._held:
                job = self._queue.get()
                if job is None:
                    return
                self._held.append(job)
            self._drain()
            self._gather()
            batch = self._take()
            self._depth()
            if batch:
                self._run(batch)

    def _gather(self) -> None:
        """Under load, wait briefly for a batch as large as the recent ones.

        Without this, a busy server settles into two alternating half-size batches: the clients answered by one
        batch send their next requests while the other half runs. So while fewer rows wait than the largest of the
        last batches had, wait for more, at most `gather` x the last batch's duration. One client (recent batches
        of one row) never waits."""
        if not self._recent or self.gather <= 0:
            return
        target = min(self.max_batch, max(rows for rows, _ in self._recent))
        deadline = time.perf_counter() + self.gather * self._recent[-1][1]
        while sum(len(j.prompts) for j in self._held) < target:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                return
            if job is None:
                self._queue.put(None)
                return
            self._held.append(job)

    def _drain(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._queue.put(None)  # close after what is waiting
                return
            self._held.append(job)

    def _take(self) -> list[tuple[Job, list[list[int]]]]:
        """The oldest job and every waiting job that can share its batch, tokenized (bad jobs fail alone)."""
        batch: list[tuple[Job, list[list[int]]]] = []
        key, rows, longest, new = None, 0, 0, 0
        for job in list(self._held):
            if job.cancelled:
                self._held.remove(job)
                job.future.cancel()
                self._finish_events(job)
                continue
            if key is not None and job.key() != key:
                continue
            try:
                ids = [self._prompt(p, job.max_tokens) for p in job.prompts]
            except ValueError as exc:
                self._held.remove(job)
                job.future.set_exception(exc)
                self._finish_events(job)
                continue
            width, steps = max(longest, *(len(r) for r in ids)), max(new, job.max_tokens)
            fits = rows + len(ids) <= self.max_batch and (rows + len(ids)) * (width + steps) <= self.max_batch_tokens
            if batch and not fits:
                break  # keep arrival order: a later job never overtakes a compatible earlier one that did not fit
            self._held.remove(job)
            batch.append((job, ids))
            key, rows, longest, new = job.key(), rows + len(ids), width, steps
        return batch

    @staticmethod
    @contextmanager
    def _seeded(seed: int | None):
        """A seeded job draws from its own seed and leaves the global generators as they were; an unseeded one
        draws from them (forking them too would give every unseeded batch the same numbers)."""
        if seed is None:
            yield
            return
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _prompt(self, prompt: str, max_tokens: int) -> list[int]:
        """The prompt's token ids; ValueError (that job's 422 alone) if it has none or does not fit the context."""
        ids = prompt_ids(self.editor.tokenizer, prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        limit = _max_positions(self.editor.model.config)
        if limit is not None and len(ids) + max_tokens > limit:
            raise ValueError(f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed the model's "
                             f"context of {limit} tokens")
        return ids

    def _run(self, batch: list[tuple[Job, list[list[int]]]]) -> None:
        tok = self.editor.tokenizer
        first = batch[0][0]
        rows = [r for _, ids in batch for r in ids]
        texts = [(job, i, RowText(tok, job.stops, job.max_tokens, lazy=job.events is None))
                 for job, ids in batch for i in range(len(ids))]
        want_logits = any(job.logprobs is not None for job, _ in batch)
        answered: set[int] = set()
        spans = list(_offsets(batch))  # (job, its rows, its first row's index)
        where = {id(job): (ids, k) for job, ids, k in spans}

        def early(job: Job) -> None:  # a job whose rows all finished is answered now, not when the batch ends
            if job.logprobs is None:  # (its logprobs come from the whole batch's logits, at the end)
                ids, k = where[id(job)]
                job.future.set_result(self._result(job, ids, texts[k : k + len(ids)], None, tok))
                self._finish_events(job)
                answered.add(id(job))

        try:
            with self.guard.read(), self._seeded(first.seed):
                started = time.perf_counter()  # the generation alone, not the wait for the lock
                fan = _Fanout(texts, tok.eos_token_id, done=early)
                out, logits = self.editor.generate_rows(
                    rows, max(job.max_tokens for job, _ in batch), streamer=fan, logits=want_logits,
                    stopping_criteria=StoppingCriteriaList([_AllFinished(fan, max(map(len, rows)))]),
                    **first.generate_kwargs())
                seconds = time.perf_counter() - started
                results = {id(job): self._result(job, ids, texts[k : k + len(ids)],
                                                 None if logits is None else logits[k : k + len(ids)], tok)
                           for job, ids, k in spans if id(job) not in answered}
        except BaseException as exc:  # every waiting request gets the error
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
                if id(job) not in answered:
                    self._finish_events(job)
            return
        self._recent.append((len(rows), seconds))
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(rows))
            self.metrics.batch_seconds.observe(seconds)
        for job, _ in batch:
            if id(job) in results:
                job.future.set_result(results[id(job)])
                self._finish_events(job)

    @staticmethod
    def _finish_events(job: Job) -> None:
        if job.events is not None:
            job.events.put(None)

    @staticmethod
    def _result(job: Job, ids: list[list[int]], texts, logits, tok) -> Result:
        """The job's answer from its rows' texts (and, for logprobs, their logits)."""
        choices = []
        for i, (_, _, text) in enumerate(texts):
            text.close()
            lp = None
            if job.logprobs is not None and logits is not None:
                lp = _logprobs(tok, text, logits[i], job.logprobs, len(job.prompts[i]))
            choices.append(Choice(text.text, text.tokens, text.finish, lp))
        return Result(choices, sum(len(r) for r in ids[:: job.n]))


class _AllFinished(StoppingCriteria):
    """Per row: finished once its text has (stop sequence, eos, its own max_tokens), so the batch ends when every
    row has, not at the longest max_tokens. It takes the step's tokens itself (transformers 5 calls the criteria
    before the streamer), so the decision is this step's."""

    def __init__(self, fan: _Fanout, width: int) -> None:
        self.fan, self.width = fan, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.fan.take(input_ids.shape[1] - self.width, input_ids[:, -1].tolist())
        return torch.tensor(self.fan.finished(), dtype=torch.bool, device=input_ids.device)


def _offsets(batch: list[tuple[Job, list[list[int]]]]):
    """(job, its rows, the index of its first row in the batch) for each job of a batch."""
    k = 0
    for job, ids in batch:
        yield job, ids, k
        k += len(ids)


def _logprobs(tok, text: RowText, logits: torch.Tensor, top: int, offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs block for the tokens that made the (stop-cut) text."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    at = 0
    for step, token in enumerate(text.tokens):
        if at >= len(text.text) and (text.text or text.finish == "stop"):
            break
        lp = torch.log_softmax(logits[step], -1)
        piece = tok.decode([token], skip_special_tokens=True)
        out["tokens"].append(piece)
        out["token_logprobs"].append(float(lp[token]))
        out["text_offset"].append(offset + at)
        if top:
            vals, idx = lp.topk(top)
            alts: dict[str, float] = {}
            for v, i in zip(vals.tolist(), idx.tolist()):
                alts.setdefault(tok.decode([i], skip_special_tokens=True), v)
            out["top_logprobs"].append(alts)
        else:
            out["top_logprobs"].append(None)
        at += len(piece)
    return out
