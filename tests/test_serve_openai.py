"""The service as OpenAI clients use it: batched completions equal to solo ones, chat, streaming, n, logprobs,
metrics and the offline /docs page."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from fastapi.testclient import TestClient  # noqa: E402

from editbank import Editor  # noqa: E402
from editbank.serve import ServeConfig, create_app  # noqa: E402
from editbank.serve.batcher import Batcher, Job, RowText  # noqa: E402
from editbank.serve.guard import ModelGuard  # noqa: E402
from editbank.serve.metrics import Metrics  # noqa: E402

TOKEN = "t" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"wise": {"n_prefixes": 2, "n_iter": 20}, "repair": {"n_prefixes": 2, "n_iter": 20}}


class Gate(ModelGuard):
    """A guard whose first read waits until the test opens it, so the jobs submitted meanwhile queue up."""

    def __init__(self) -> None:
        super().__init__()
        self.reached, self.opened = threading.Event(), threading.Event()

    @contextmanager
    def read(self):
        self.reached.set()
        assert self.opened.wait(60)
        with super().read():
            yield


@pytest.mark.parametrize("method", ["sola", "grace", "wise", "repair"])
def test_a_batch_of_concurrent_requests_answers_each_as_if_served_alone(small_world, world_requests, tmp_path,
                                                                        method):
    ed = Editor.open(small_world.path, method=method, store=tmp_path / "s.db", **FAST.get(method, {}))
    ed.edit(world_requests[:4], check=False)
    # edited prompts, their rephrases and unrelated probes: rows of one batch take different routes
    prompts = [r.prompt for r in world_requests[:4]] + [r.rephrases[0] for r in world_requests[:3]]
    prompts += [p for r in world_requests[4:6] for p, _ in r.locality[:2]]
    alone = {p: ed.generate_ids(p, 6)[0] for p in prompts}
    gate, metrics = Gate(), Metrics()
    batcher = Batcher(ed, gate, max_batch=64, metrics=metrics)
    try:
        first = batcher.submit(Job(prompts=[prompts[0]], max_tokens=6))
        assert gate.reached.wait(30)  # the worker holds job 0 and waits: the rest queue behind it
        jobs = [Job(prompts=[p], max_tokens=k) for p in prompts for k in (3, 6)]
        futures = [batcher.submit(j) for j in jobs]
        gate.opened.set()
        assert first.result(60).choices[0].tokens == alone[prompts[0]]
        for job, fut in zip(jobs, futures):
            got = fut.result(60).choices[0].tokens
            assert got == alone[job.prompts[0]][: job.max_tokens], f"{method}: {job.prompts[0]!r}"
    finally:
        batcher.close()
        ed.close()
    rows = metrics.registry.get_sample_value("editbank_batch_rows_sum")
    batches = metrics.registry.get_sample_value("editbank_batch_rows_count")
    assert batches == 2 and rows == 1 + len(jobs), "the queued requests ran as one batch"


def test_row_text_streams_deltas_that_join_to_the_cut_text(world_model):
    _, tok = world_model
    ids = tok("Alpha beta gamma delta epsilon")["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    stop = full[full.index("gamma"):][:4]
    row = RowText(tok, [stop], max_tokens=100)
    deltas = [row.add(t) for t in ids] + [row.close()]
    assert "".join(deltas) == full[: full.index(stop)] == row.text and row.finish == "stop"
    for d in deltas:
        assert stop[:2] not in d, "no part of the stop sequence is streamed"
    lazy = RowText(tok, [], max_tokens=3, lazy=True)
    assert [lazy.add(t) for t in ids[:3]][:2] == ["", ""] and lazy.finish == "length"
    assert lazy.text == tok.decode(ids[:3], skip_special_tokens=True)


@pytest.fixture
def served(small_world, tmp_path):
    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    app = create_app(ed, ServeConfig(token=TOKEN, max_body=1 << 16, read_timeout=5))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=TOKEN, http_client=http, max_retries=0)
        yield ed, http, client
    ed.close()


def test_the_official_openai_client_works(served, world_requests):
    ed, http, client = served
    r = world_requests[0]
    assert http.post("/v1/edits", json={"prompt": r.prompt, "target": r.target}, headers=AUTH).status_code == 201
    want = ed.generate(r.prompt, max_new_tokens=12)
    assert want.startswith(r.target)
    assert [m.id for m in client.models.list()] == ["editbank"]

    out = client.completions.create(model="editbank", prompt=r.prompt, max_tokens=12)
    assert out.choices[0].text == want and out.usage.completion_tokens > 0

    chunks = list(client.completions.create(model="editbank", prompt=r.prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason

    chat = client.chat.completions.create(model="editbank", messages=[{"role": "user", "content": r.prompt}],
                                          max_tokens=12)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="editbank", messages=[{"role": "user", "content": r.prompt}],
                                            max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want

    two = client.completions.create(model="editbank", prompt=[r.prompt, world_requests[1].prompt], max_tokens=4,
                                    n=2, temperature=1.0, seed=5)
    assert len(two.choices) == 4 and [c.index for c in two.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="editbank", prompt=[r.prompt, world_requests[1].prompt], max_tokens=4,
                                      n=2, temperature=1.0, seed=5)
    assert [c.text for c in two.choices] == [c.text for c in again.choices], "a seed repeats"


def test_logprobs_are_the_edited_models(served, world_requests):
    import torch

    ed, http, _ = served
    r = world_requests[2]
    http.post("/v1/edits", json={"prompt": r.prompt, "target": r.target}, headers=AUTH)
    res = http.post("/v1/completions", json={"prompt": r.prompt, "max_tokens": 3, "logprobs": 2}).json()
    lp = res["choices"][0]["logprobs"]
    tokens = ed.generate_ids(r.prompt, 3)[0]
    assert "".join(lp["tokens"]) == res["choices"][0]["text"] and len(lp["token_logprobs"]) == len(tokens)
    ids = ed.tokenizer(r.prompt, return_tensors="pt")["input_ids"]
    for step, token in enumerate(tokens):  # teacher-forced on the generated prefix (routing at the prompt end)
        seq = torch.cat([ids, torch.tensor([tokens[:step]], dtype=torch.long)], 1)
        q = torch.tensor([ids.shape[1] - 1])
        want = torch.log_softmax(ed.logits(seq, query_index=q)[0, -1].float(), -1)[token].item()
        assert abs(lp["token_logprobs"][step] - want) < 1e-4
        top = lp["top_logprobs"][step]
        assert len(top) == 2 and max(top.values()) == pytest.approx(lp["token_logprobs"][step], abs=1e-6)
    assert lp["text_offset"][0] == len(r.prompt)
    bad = http.post("/v1/completions", json={"prompt": r.prompt, "logprobs": 1, "stream": True})
    assert bad.status_code == 422 and "not streamed" in bad.json()["error"]["message"]


def test_chat_without_a_template_is_the_plain_continuation(served, world_requests):
    ed, http, _ = served
    assert not getattr(ed.tokenizer, "chat_template", None)
    msgs = [{"role": "system", "content": "Facts."}, {"role": "user", "content": world_requests[3].prompt}]
    got = http.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 5}).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"]["content"] == ed.generate("Facts.\n" + world_requests[3].prompt, 5)


def test_metrics_and_offline_docs(served, world_requests):
    _, http, _ = served
    r = world_requests[0]
    http.post("/v1/completions", json={"prompt": r.prompt, "max_tokens": 2})
    http.post("/v1/edits", json={"prompt": r.prompt, "target": r.target}, headers=AUTH)
    http.post("/v1/edits", json={"prompt": r.prompt, "target": r.target})  # 401
    text = http.get("/metrics").text
    assert 'editbank_requests_total{endpoint="/v1/completions",method="POST",status="200"} 1.0' in text
    assert 'editbank_requests_total{endpoint="/v1/edits",method="POST",status="401"} 1.0' in text
    assert "editbank_edits_applied_total 1.0" in text and "editbank_active_edits 1.0" in text
    assert "editbank_batch_rows_count 1.0" in text and "editbank_edit_seconds_count 1.0" in text
    page = http.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    js = http.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000


@pytest.mark.parametrize("method", ["sola", "grace", "rome"])
def test_an_edit_is_computed_while_completions_are_served(small_world, world_requests, tmp_path, monkeypatch, method):
    ed = Editor.open(small_world.path, method=method, store=tmp_path / "s.db")
    app = create_app(ed, ServeConfig(token=TOKEN, max_body=1 << 16, read_timeout=5))
    r = world_requests[5]
    cls = type(ed.method)
    real, entered, release = cls.pretrain, threading.Event(), threading.Event()

    def slow(self, requests):
        entered.set()
        assert release.wait(60)
        return real(self, requests)

    monkeypatch.setattr(cls, "pretrain", slow)
    result = {}
    with TestClient(app) as http:
        before = http.post("/v1/completions", json={"prompt": r.prompt, "max_tokens": 12}).json()["choices"][0]["text"]
        t = threading.Thread(target=lambda: result.update(res=http.post(
            "/v1/edits", json={"prompt": r.prompt, "target": r.target, "subject": r.subject, "check": False},
            headers=AUTH)))
        t.start()
        try:
            assert entered.wait(30)
            during = http.post("/v1/completions", json={"prompt": r.prompt, "max_tokens": 12})
            assert during.status_code == 200 and during.json()["choices"][0]["text"] == before, "served, old state"
            assert http.get("/healthz").json()["editing"] is True
        finally:
            release.set()
            t.join()
        assert result["res"].status_code == 201, result["res"].text
        after = http.post("/v1/completions", json={"prompt": r.prompt, "max_tokens": 12}).json()["choices"][0]["text"]
    assert len(ed.edits("active")) == 1 and after == ed.generate(r.prompt, max_new_tokens=12)
    if method != "rome":  # ROME's defaults do not write this fact on the small world (the test is about when)
        assert after.startswith(r.target)
    ed.close()


BESIDE = {"sola": ("_train", {}), "grace": ("_train", {}), **{m: ("_compute", {"v_num_grad_steps": 10, "n_prefixes": 2})
                                                              for m in ("rome", "memit", "alphaedit", "metake")}}


@pytest.mark.parametrize("method", sorted(BESIDE))
def test_a_pretrained_edit_is_bitwise_the_edit_computed_in_one_go(small_world, world_requests, tmp_path, method):
    import torch

    from editbank.methods import get_method

    assert sorted(m for m in ("sola", "grace", "ft", "wise", "repair", "rome", "memit", "alphaedit", "metake")
                  if get_method(m).trains_beside_readers) == sorted(BESIDE), "every such method is in this grid"
    heavy, hp = BESIDE[method]
    reqs = world_requests[6:9]
    probes = [q.prompt for q in world_requests[:9]] + [p for q in world_requests[6:9] for p in q.rephrases[:1]]
    eds = [Editor.open(small_world.path, method=method, store=tmp_path / f"{k}.db", **hp) for k in "ab"]
    try:
        for ed in eds:
            ed.method.prepare()
            ed.edit(world_requests[:2], check=False)  # the writes to compute start from an edited state
        plain = eds[0].edit(reqs, check=False)
        seen: list[list[int]] = []
        before = eds[1].generate_ids(probes, 4)
        worker = threading.Thread(target=lambda: seen.extend(eds[1].generate_ids(probes, 4) for _ in range(10)))
        worker.start()  # forwards through the same model (and hooks) while the edit is computed
        work = eds[1].pretrain(reqs)
        worker.join()
        assert work, "the edit was computed beside the readers"

        def no_work(*args, **kwargs):
            raise AssertionError("apply computed the edit again instead of installing the pretrained one")

        setattr(eds[1].method, heavy, no_work)
        pre = eds[1].edit(reqs, check=False, pretrained=work)
        for a, b in zip(plain, pre):
            x, y = eds[0].method.artifacts(a.id), eds[1].method.artifacts(b.id)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            assert a.stats["loss"] == b.stats["loss"]
        for name, p in eds[0].method.touched_parameters().items():
            assert torch.equal(p, eds[1].method.touched_parameters()[name]), name
        assert eds[0].generate_ids(probes, 4) == eds[1].generate_ids(probes, 4)
        assert all(s == before for s in seen), "the readers saw the state before the edit throughout"
    finally:
        for ed in eds:
            ed.close()


def test_unseeded_sampling_draws_new_numbers_each_time(served, world_requests):
    _, http, _ = served
    body = {"prompt": "The", "max_tokens": 8, "temperature": 2.0}  # open-ended: 20 of 20 draws differ in-process
    texts = {http.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(5)}
    assert len(texts) > 1, "each unseeded sample is a new draw"


def test_routing_reads_stay_right_while_an_edit_trains_beside_them(small_world, world_requests, tmp_path):
    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    ed.edit(world_requests[:4], check=False)
    prompts = [r.prompt for r in world_requests[:4]] + [p for r in world_requests[4:8] for p, _ in r.locality[:1]]
    want = ed.method.routes(prompts)
    errors: list[BaseException] = []

    def train():
        try:
            for _ in range(3):
                ed.pretrain(world_requests[8:11])
        except BaseException as exc:  # an edit that crashed beside the readers
            errors.append(exc)

    worker = threading.Thread(target=train)
    worker.start()
    seen = []
    while worker.is_alive():
        seen.append(ed.method.routes(prompts))
    worker.join()
    ed.close()
    assert not errors and seen and all(s == want for s in seen), "keys read beside a training stay the prompt's"


def test_a_job_given_up_before_its_batch_never_runs(small_world, world_requests, tmp_path):
    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    gate, metrics = Gate(), Metrics()
    batcher = Batcher(ed, gate, metrics=metrics)
    try:
        first = batcher.submit(Job(prompts=[world_requests[0].prompt], max_tokens=2))
        assert gate.reached.wait(30)
        gone, kept = Job(prompts=[world_requests[1].prompt], max_tokens=2), Job(prompts=[world_requests[2].prompt],
                                                                                   max_tokens=2)
        batcher.submit(gone)
        batcher.submit(kept)
        gone.cancelled = True  # what the app does when the request's wait times out (503)
        gate.opened.set()
        first.result(60)
        assert len(kept.future.result(60).choices) == 1 and gone.future.cancelled()
    finally:
        batcher.close()
        ed.close()
    assert metrics.registry.get_sample_value("editbank_batch_rows_sum") == 2, "only the live jobs ran"


def test_a_short_job_is_answered_before_its_batch_ends_and_a_batch_ends_when_every_row_has(tmp_path):
    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()  # a random model: it rarely writes eos, so a long job runs all its steps
    ed = Editor(tiny_model("llama", len(tok)), tok, method="sola", store=tmp_path / "s.db")
    gate = Gate()
    batcher = Batcher(ed, gate, max_batch=64)
    p, q = "The capital of Arvelia is", "Kestrel was born in"
    long_tokens = ed.generate_ids(q, 40)[0]
    assert len(long_tokens) == 40
    steps: list[int] = []
    handle = ed.model.register_forward_hook(lambda *a: steps.append(1))  # one call per generation step
    try:
        first = batcher.submit(Job(prompts=[p], max_tokens=2))
        assert gate.reached.wait(30)  # the worker waits: the next two jobs queue into one batch
        short, long = Job(prompts=[p], max_tokens=2), Job(prompts=[q], max_tokens=40)
        at = {}  # generation steps run when each was answered
        short.future.add_done_callback(lambda f: at.setdefault("short", len(steps)))
        long.future.add_done_callback(lambda f: at.setdefault("long", len(steps)))
        batcher.submit(short)
        batcher.submit(long)
        gate.opened.set()
        first.result(60)
        assert short.future.result(60).choices[0].tokens == ed.generate_ids(p, 2)[0]
        assert long.future.result(60).choices[0].tokens == long_tokens
        assert at["short"] + 30 < at["long"], "the short job was answered after its own steps, not the batch's"

        stop = ed.tokenizer.decode(long_tokens[:3], skip_special_tokens=True)[-2:]  # the long answer's third token
        assert stop.strip(), "a visible stop sequence"
        steps.clear()
        text = batcher.submit(Job(prompts=[q], max_tokens=40, stops=[stop])).result(60).choices[0]
        assert text.finish_reason == "stop" and len(steps) <= 3, "the batch ended at the step its only row stopped"
    finally:
        handle.remove()
        batcher.close()
        ed.close()
