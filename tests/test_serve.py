"""The HTTP service: OpenAI-style completions, edits and undos with a token, limits, status codes, a busy model."""

from __future__ import annotations

import threading

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from editbank import Editor  # noqa: E402
from editbank.cli import app as cli_app  # noqa: E402
from editbank.serve import ServeConfig, create_app  # noqa: E402

TOKEN = "t" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def served(small_world, tmp_path):
    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    client = TestClient(create_app(ed, ServeConfig(token=TOKEN, max_body=4096, read_timeout=0.3)))
    yield ed, client
    ed.close()


def complete(client, prompt, **kw):
    res = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, **kw})
    assert res.status_code == 200, res.text
    return res.json()


def test_completions_are_the_edited_models_and_openai_shaped(served, world_requests):
    ed, client = served
    r = world_requests[0]
    out = complete(client, [r.prompt, world_requests[1].prompt])
    assert out["object"] == "text_completion" and len(out["choices"]) == 2
    assert out["choices"][0]["text"] == ed.generate(r.prompt, max_new_tokens=4)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    first = out["choices"][0]["text"]
    cut = complete(client, r.prompt, stop=first[2:4])["choices"][0]
    assert cut["text"] == first[: first.index(first[2:4])] and cut["finish_reason"] == "stop"
    a = complete(client, r.prompt, temperature=1.5, seed=7)["choices"][0]["text"]
    assert a == complete(client, r.prompt, temperature=1.5, seed=7)["choices"][0]["text"], "a seed repeats"


def test_edit_ask_undo_through_the_api(served, world_requests):
    ed, client = served
    r = world_requests[0]
    before = complete(client, r.prompt)["choices"][0]["text"]
    res = client.post("/v1/edits", json={"prompt": r.prompt, "target": r.target, "subject": r.subject}, headers=AUTH)
    assert res.status_code == 201, res.text
    edit = res.json()
    assert edit["status"] == "active" and ed.store.get_edit(edit["id"]).status == "active"
    assert complete(client, r.prompt, max_tokens=12)["choices"][0]["text"].startswith(r.target)
    assert [e["id"] for e in client.get("/v1/edits").json()["data"]] == [edit["id"]]
    assert client.get(f"/v1/edits/{edit['id']}").json()["target"] == r.target
    assert client.delete(f"/v1/edits/{edit['id']}", headers=AUTH).json()["status"] == "reverted"
    assert complete(client, r.prompt)["choices"][0]["text"] == before
    assert client.delete(f"/v1/edits/{edit['id']}", headers=AUTH).status_code == 409
    assert client.delete("/v1/edits/999", headers=AUTH).status_code == 404
    assert client.get("/v1/edits/999").status_code == 404
    batch = [{"prompt": q.prompt, "target": q.target} for q in world_requests[1:3]]
    res = client.post("/v1/edits", json=batch, headers=AUTH)
    assert res.status_code == 201 and len(res.json()["data"]) == 2
    assert client.get("/healthz").json()["active_edits"] == 2


@pytest.mark.parametrize("kind", ["no token", "wrong token", "too large", "bad json", "extra field", "empty target",
                                  "not an edit", "too many"])
def test_bad_requests_get_the_right_status_and_change_nothing(served, world_requests, kind):
    ed, client = served
    r = world_requests[0]
    body = {"prompt": r.prompt, "target": r.target}
    call = {"no token": (401, dict(json=body)),
            "wrong token": (401, dict(json=body, headers={"Authorization": "Bearer " + "x" * 24})),
            "too large": (413, dict(json={**body, "rephrases": ["y" * 3000, "z" * 3000]}, headers=AUTH)),
            "bad json": (422, dict(content=b'{"prompt": ', headers={**AUTH, "Content-Type": "application/json"})),
            "extra field": (422, dict(json={**body, "colour": "red"}, headers=AUTH)),
            "empty target": (422, dict(json={**body, "target": ""}, headers=AUTH)),
            "not an edit": (400, dict(json={**body, "prompt": "word " * 600}, headers=AUTH)),  # > the context
            "too many": (422, dict(json=[body] * 65, headers=AUTH))}[kind]
    status, kw = call
    res = client.post("/v1/edits", **kw)
    assert res.status_code == status, res.text
    assert res.json()["error"]["status"] == status and res.json()["error"]["message"]
    if status == 401:
        assert res.headers["WWW-Authenticate"] == "Bearer"
    assert ed.edits() == [] and client.get("/v1/edits").json()["data"] == []
    assert client.post("/v1/completions", json={"prompt": r.prompt, "n": 9}).status_code == 422


def test_a_completion_during_a_long_edit_gets_503_then_the_new_state(served, world_requests, monkeypatch):
    ed, client = served
    r = world_requests[0]
    real = Editor.edit
    started, release = threading.Event(), threading.Event()

    def slow(self, reqs, **kw):  # holds the model until the test has seen the 503
        started.set()
        assert release.wait(30)
        return real(self, reqs, **kw)

    monkeypatch.setattr(Editor, "edit", slow)
    result = {}
    t = threading.Thread(target=lambda: result.update(res=client.post(
        "/v1/edits", json={"prompt": r.prompt, "target": r.target}, headers=AUTH)))
    t.start()
    started.wait(5)
    busy = client.post("/v1/completions", json={"prompt": r.prompt, "max_tokens": 4})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert client.get("/healthz").json()["editing"] is True
    release.set()
    t.join()
    assert result["res"].status_code == 201
    assert complete(client, r.prompt, max_tokens=12)["choices"][0]["text"].startswith(r.target)


def test_page_and_openapi(served):
    _, client = served
    html = client.get("/").text
    assert all(f'id="{i}"' in html for i in ("prompt", "ask", "answer", "edit-prompt", "apply", "edits", "token"))
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/edits", "/v1/edits/{edit_id}", "/healthz"} <= set(paths)


def test_serve_refuses_a_public_address_without_a_token(tmp_path):
    res = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "s.db")],
                             env={"EDITBANK_TOKEN": ""})
    assert res.exit_code == 2 and "without a token" in res.output
    assert not (tmp_path / "s.db").exists()


def test_models_lists_the_served_model(served):
    ed, client = served
    res = client.get("/v1/models")
    assert res.status_code == 200
    (m,) = res.json()["data"]
    assert m["object"] == "model" and m["id"] == complete(client, "a")["model"] and "sola" in m["owned_by"]
