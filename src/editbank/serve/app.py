"""The FastAPI app: OpenAI-style completions from the edited model, edits and undos, a web page.

Every use of the editor goes through one `ModelGuard`, so a completion sees the model before or after an edit,
never during it, and an edit is acknowledged (201) only after its store transaction committed.
"""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..methods.base import EditFailed, EditNotWritten
from .guard import Busy, ModelGuard
from .limits import BodyLimit

Text = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Short = Annotated[str, StringConstraints(min_length=1, max_length=1000)]


@dataclass
class ServeConfig:
    token: str  # bearer token of the mutating endpoints
    max_body: int = 1 << 20  # bytes
    read_timeout: float = 10.0  # seconds a completion waits for an edit to finish before 503
    name: str = "editbank"


class CompletionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=32)]
    max_tokens: int = Field(16, ge=1, le=256)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: Short | Annotated[list[Short], Field(max_length=4)] | None = None
    seed: int | None = None
    model: str | None = None  # accepted for OpenAI clients; there is one model
    n: Literal[1] = 1
    stream: Literal[False] = False


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    target: Short
    subject: Short | None = None
    rephrases: Annotated[list[Text], Field(max_length=32)] = []
    locality: Annotated[list[tuple[Text, Short]], Field(max_length=32)] = []
    portability: Annotated[list[tuple[Text, Short]], Field(max_length=32)] = []
    key: Short | None = None
    meta: dict[str, Any] = {}
    check: bool = True  # refuse (422) an edit that did not take; false keeps it, marked "written": false


class RouteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def _edit_json(edit) -> dict[str, Any]:
    r = edit.request
    return {"object": "edit", "id": edit.id, "status": edit.status, "prompt": r.prompt, "target": r.target,
            "subject": r.subject, "method": edit.method, "batch": edit.batch, "created": edit.created,
            "updated": edit.updated, "written": edit.stats.get("written"), "loss": edit.stats.get("loss"),
            "request": r.to_dict()}


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def create_app(editor, config: ServeConfig) -> FastAPI:
    """The app serving `editor` (an open `Editor` with its store)."""
    if not config.token:
        raise ValueError("a bearer token is required")
    guard = ModelGuard(read_timeout=config.read_timeout)
    app = FastAPI(title="editbank", version=_version(),
                  description="An edited language model: completions, and edits/undos applied live.")
    app.add_middleware(BodyLimit, max_bytes=config.max_body)
    bearer = HTTPBearer(auto_error=False)
    state = {"active": len(editor.edits("active"))}

    def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), config.token.encode()):
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        return _error(422, "; ".join(parts[:10]) or "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "method": editor.method.name, "active_edits": state["active"],
                "editing": guard.writing}

    @app.post("/v1/completions")
    def completions(body: CompletionIn) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        kw: dict[str, Any] = {}
        if body.temperature > 0:
            kw = {"do_sample": True, "temperature": body.temperature, "top_k": 0}
        with guard.read(), torch.random.fork_rng(devices=[]):
            if body.seed is not None:
                torch.manual_seed(body.seed)
            try:
                ids = editor.generate_ids(prompts, body.max_tokens, **kw)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            # the tokenizer is used under the guard too: a Rust tokenizer shared across threads can refuse a call
            texts = [editor.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
            n_prompt = sum(len(editor.tokenizer(p)["input_ids"]) for p in prompts)
        choices, used = [], 0
        for i, (row, full) in enumerate(zip(ids, texts)):
            text, stopped = _cut(full, stops)
            used += len(row)
            reason = "stop" if stopped or len(row) < body.max_tokens else "length"
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": config.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}}

    started = int(time.time())

    @app.get("/v1/models")
    def models() -> dict[str, Any]:  # what OpenAI clients call first (`client.models.list()`)
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": started,
                                            "owned_by": f"editbank ({editor.method.name} edits)"}]}

    @app.post("/v1/route")
    def route(body: RouteIn) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not hasattr(editor.method, "routes"):
            raise HTTPException(400, f"method {editor.method.name} has no content router (SoLA has)")
        with guard.read():
            owners = editor.method.routes(prompts)
        return {"object": "list", "data": [{"prompt": p, "edit": o} for p, o in zip(prompts, owners)]}

    @app.get("/v1/edits")
    def list_edits(status: Literal["active", "reverted", "superseded"] | None = None) -> dict[str, Any]:
        with guard.read():
            edits = editor.edits(status)
        return {"object": "list", "data": [_edit_json(e) for e in edits]}

    @app.get("/v1/edits/{edit_id}")
    def get_edit(edit_id: int) -> dict[str, Any]:
        with guard.read():
            try:
                return _edit_json(editor.store.get_edit(edit_id))
            except KeyError:
                raise HTTPException(404, f"no edit with id {edit_id}") from None

    @app.post("/v1/edits", status_code=201, dependencies=[Depends(require_token)])
    def post_edits(body: EditIn | Annotated[list[EditIn], Field(min_length=1, max_length=64)]) -> dict[str, Any]:
        items = [body] if isinstance(body, EditIn) else body
        with guard.write():
            try:
                reqs = [editor.validate(b.model_dump(exclude={"check"})) for b in items]
            except (ValueError, TypeError) as exc:  # well-formed, but not an edit this model and method can take
                raise HTTPException(400, str(exc)) from None
            try:
                edits = editor.edit(reqs, check=any(b.check for b in items))  # a list: checked unless all say no
            except EditNotWritten as exc:
                return JSONResponse({"error": {"status": 422, "message": str(exc), "failures": exc.failures}},
                                    status_code=422)
            except (ValueError, TypeError) as exc:
                raise HTTPException(400, f"the edit was refused and nothing changed: {exc}") from None
            except EditFailed as exc:
                raise HTTPException(500, f"the edit failed and nothing changed: {exc}") from None
            state["active"] = len(editor.edits("active"))
        data = [_edit_json(e) for e in edits]
        return data[0] if isinstance(body, EditIn) else {"object": "list", "data": data}

    @app.delete("/v1/edits/{edit_id}", dependencies=[Depends(require_token)])
    def delete_edit(edit_id: int) -> dict[str, Any]:
        with guard.write():
            try:
                edit = editor.undo(edit_id)
            except KeyError:
                raise HTTPException(404, f"no edit with id {edit_id}") from None
            except ValueError as exc:
                raise HTTPException(409, str(exc)) from None
            state["active"] = len(editor.edits("active"))
        return _edit_json(edit)

    return app


def _version() -> str:
    from .._version import __version__

    return __version__
