"""The FastAPI app: OpenAI-compatible completions and chat from the edited model, edits and undos, a web page.

Every use of the editor goes through one `ModelGuard`, so a completion sees the model before or after an edit,
never during it, and an edit is acknowledged (201) only after its store transaction committed. Completions run
on one `Batcher` worker that joins concurrent requests into shared forwards (`openai_api` has the request shapes).
"""

from __future__ import annotations

import hmac
import queue
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..methods.base import EditFailed, EditNotWritten
from .batcher import Batcher, Job
from .guard import Busy, ModelGuard
from .limits import BodyLimit
from .metrics import Metrics, Observe
from .openai_api import ChatIn, CompletionIn, Short, Text, chat_json, chat_prompt, completion_json, sse


@dataclass
class ServeConfig:
    token: str  # bearer token of the mutating endpoints
    max_body: int = 1 << 20  # bytes
    read_timeout: float = 10.0  # seconds a completion waits for an edit to finish before 503
    name: str = "editbank"
    max_batch: int = 32  # rows per shared generate (1: one request at a time)
    max_batch_tokens: int = 16384  # padded prompt + new tokens per batch
    batch_wait: float = 0.5  # under load, wait up to this x the last batch's time for a batch as large as recent ones
    queue_timeout: float = 300.0  # seconds a request waits for its batch before 503


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


class AskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[list[Text], Field(min_length=1, max_length=32)]
    max_tokens: int = Field(16, ge=1, le=64)


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


def create_app(editor, config: ServeConfig) -> FastAPI:
    """The app serving `editor` (an open `Editor` with its store)."""
    if not config.token:
        raise ValueError("a bearer token is required")
    guard = ModelGuard(read_timeout=config.read_timeout)
    metrics = Metrics()
    batcher = Batcher(editor, guard, max_batch=config.max_batch, max_batch_tokens=config.max_batch_tokens,
                      metrics=metrics, gather=config.batch_wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="editbank", version=_version(), docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="An edited language model: completions, and edits/undos applied live.")
    app.state.batcher, app.state.metrics = batcher, metrics
    app.add_middleware(BodyLimit, max_bytes=config.max_body)
    app.add_middleware(Observe, metrics=metrics)
    bearer = HTTPBearer(auto_error=False)
    state = {"active": len(editor.edits("active"))}
    metrics.active.set(state["active"])
    if not editor.read_only:
        editor.method.prepare()  # calibrate now: an edit's training then runs beside the readers (see guard)

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

    def run(job: Job, kind: str, include_usage: bool, build) -> Any:
        """Queue a job; a JSON response, or an event stream once its first token is out."""
        batcher.submit(job)
        if job.events is not None:
            try:
                first = job.events.get(timeout=config.queue_timeout)
            except queue.Empty:
                job.cancelled = True
                raise Busy("the completion queue is too long; retry shortly") from None
            if first is not None:
                return StreamingResponse(sse(job, first, kind, config.name, include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return build(job.future.result(timeout=config.queue_timeout), config.name)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except FutureTimeout:
            job.cancelled = True  # not run later for nobody
            raise Busy("the completion queue is too long; retry shortly") from None

    @app.post("/v1/completions")
    def completions(body: CompletionIn) -> Any:
        job = body.job(body.prompts(), body.max_tokens, logprobs=body.logprobs, stream=body.stream)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return run(job, "completion", usage, completion_json)

    @app.post("/v1/chat/completions")
    def chat(body: ChatIn) -> Any:
        job = body.job([chat_prompt(editor.tokenizer, body.messages)], body.budget(), stream=body.stream)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return run(job, "chat", usage, chat_json)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _docs(app)

    started = int(time.time())

    @app.get("/v1/models")
    def models() -> dict[str, Any]:  # what OpenAI clients call first (`client.models.list()`)
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": started,
                                            "owned_by": f"editbank ({editor.method.name} edits)"}]}

    @app.post("/v1/route")
    def route(body: RouteIn) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not hasattr(editor.method, "routes"):
            raise HTTPException(400, f"method {editor.method.name} has no content router (SoLA and GRACE have)")
        with guard.read():
            owners = editor.method.routes(prompts)
        return {"object": "list", "data": [{"prompt": p, "edit": o} for p, o in zip(prompts, owners)]}

    @app.post("/v1/ask", include_in_schema=True)
    def ask(body: AskIn) -> dict[str, Any]:
        """For the page: each prompt's greedy answer, the unedited model's, and the edit that answered it (methods
        with a content router; otherwise null) — several prompts in one call, each answered as if alone."""
        # the unedited answer swaps the base weights in for the weight-writing methods: not while an edit is being
        # computed beside the readers on those weights (the edit lock first, as edits take it)
        weights = bool(editor.method.touched_parameters())
        with guard.editing() if weights else nullcontext(), guard.read():
            try:
                answers = editor.generate(body.prompt, max_new_tokens=body.max_tokens)
                with editor.unedited():
                    base = editor.generate(body.prompt, max_new_tokens=body.max_tokens)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            owners = editor.method.routes(body.prompt) if hasattr(editor.method, "routes") else None
        return {"object": "list", "data": [
            {"prompt": p, "answer": a, "unedited": b, "changed": a != b, "edit": None if owners is None else owners[i]}
            for i, (p, a, b) in enumerate(zip(body.prompt, answers, base))]}

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
        with guard.editing():
            try:
                reqs = [editor.validate(b.model_dump(exclude={"check"})) for b in items]
            except (ValueError, TypeError) as exc:  # well-formed, but not an edit this model and method can take
                raise HTTPException(400, str(exc)) from None
            started = time.perf_counter()
            try:
                work = editor.pretrain(reqs)  # computed while completions go on (`trains_beside_readers`), else None
                with guard.write():  # a list is checked unless all its items say no
                    edits = editor.edit(reqs, check=any(b.check for b in items), pretrained=work)
                    state["active"] = len(editor.edits("active"))
            except EditNotWritten as exc:
                return JSONResponse({"error": {"status": 422, "message": str(exc), "failures": exc.failures}},
                                    status_code=422)
            except (ValueError, TypeError) as exc:
                raise HTTPException(400, f"the edit was refused and nothing changed: {exc}") from None
            except EditFailed as exc:
                raise HTTPException(500, f"the edit failed and nothing changed: {exc}") from None
            finally:
                metrics.edit_seconds.observe(time.perf_counter() - started)
            metrics.edits.inc(len(edits))
            metrics.active.set(state["active"])
        data = [_edit_json(e) for e in edits]
        return data[0] if isinstance(body, EditIn) else {"object": "list", "data": data}

    @app.delete("/v1/edits/{edit_id}", dependencies=[Depends(require_token)])
    def delete_edit(edit_id: int) -> dict[str, Any]:
        with guard.editing(), guard.write():
            started = time.perf_counter()
            try:
                edit = editor.undo(edit_id)
            except KeyError:
                raise HTTPException(404, f"no edit with id {edit_id}") from None
            except ValueError as exc:
                raise HTTPException(409, str(exc)) from None
            finally:
                metrics.edit_seconds.observe(time.perf_counter() - started)
            state["active"] = len(editor.edits("active"))
            metrics.undos.inc()
            metrics.active.set(state["active"])
        return _edit_json(edit)

    return app


def _docs(app: FastAPI) -> None:
    """/docs from the bundled Swagger UI assets (the default page loads them from a CDN: blank offline)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # without the bundle there is no /docs page; /openapi.json still is
        return
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="editbank API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _version() -> str:
    from .._version import __version__

    return __version__
