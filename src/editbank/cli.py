"""The `editbank` command: demo, world build, edit, undo, ls, ask, eval, export/import, bench, serve, stats.

Results go to standard output, messages and errors to standard error (so `--json` output stays parseable)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._version import __version__
from .editor import DEFAULT_METHOD, HELD
from .methods.base import EditFailed, EditNotWritten, ExportError

app = typer.Typer(help="Lifelong, reversible knowledge editing of language models.", no_args_is_help=True,
                  rich_markup_mode=None)  # plain click help: no type placeholders such as <bool> on flags
world_app = typer.Typer(help="Build the built-in fact world and its model.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(world_app, name="world")
console = Console()  # results
err_console = Console(stderr=True)  # progress, messages and errors

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Model directory, or world:small / world:default (built on first use).")
]
NewStoreOpt = Annotated[Path, typer.Option("--store", "-s", help="SQLite edit store (created if missing).")]
StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="SQLite edit store (must exist).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(msg: str, code: int = 2) -> None:
    # to stderr; no wrapping (a long path must stay whole) and no markup in the message itself
    err_console.print("[red]error:[/red]", escape(msg), soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"editbank {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Lifelong, reversible knowledge editing of language models."""


def _resolve_model(model: str, progress: bool = True) -> str:
    if model.startswith("world:"):
        from .world import World

        return str(World.build(model.split(":", 1)[1], progress=progress).path)
    return model


def _value(text: str) -> Any:
    """int, then float (YAML 1.1 reads 5e-4 as a string), then YAML (lists, bools, null, strings)."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _parse_hparams(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs:
        if "=" not in item:
            _fail(f"--hp expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def _hparams_file(path: Path, method: str | None) -> dict[str, Any]:
    """A YAML hyperparameter file; EasyEdit files (WISE, GRACE, ROME, MEMIT, AlphaEdit) are translated."""
    from .methods.base import get_method
    from .methods.easyedit import translate

    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(cfg, dict):
        _fail(f"--hparams {path}: expected a mapping of hyperparameters")
    if method is None:
        return cfg
    try:
        method = get_method(method).name  # "GRACE" is grace
    except ValueError as exc:
        _fail(str(exc))
    cfg, dropped = translate(method, cfg)
    reasons: dict[str, list[str]] = {}
    for key, why in dropped.items():
        reasons.setdefault(why, []).append(key)
    for why, keys in reasons.items():
        typer.echo(f"--hparams: ignoring {', '.join(keys)}: {why}", err=True)
    return cfg


def _open(model: str, store: Path | None, method: str | None, hp: list[str] | None = None, json_out: bool = False,
          corpus: Path | None = None, hparams: Path | None = None, read_only: bool = False):
    from .editor import Editor

    try:
        prompts = None
        overrides = {**(_hparams_file(hparams, method) if hparams else {}), **_parse_hparams(hp or [])}
        if corpus is not None:
            prompts = [ln.strip() for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if len(prompts) < 8:
                _fail(f"--corpus {corpus}: need at least 8 prompts, one per line (got {len(prompts)})")
        return Editor.open(_resolve_model(model, progress=not json_out), method=method, store=store,
                           progress=not json_out, corpus=prompts, read_only=read_only, **overrides)
    except (ValueError, TypeError, OSError, KeyError, EditFailed) as exc:
        _fail(str(exc))


def _existing_store(store: Path):
    """Open a store that must already exist (exit 2 with a message otherwise)."""
    from .store import EditStore

    if not store.exists():
        _fail(f"no store at {store}")
    try:
        return EditStore(store)
    except ValueError as exc:
        _fail(str(exc))


def _written(e) -> str:
    """Did the edit take when it was written (greedy exact match of its target)? Blank: not checked."""
    w = e.stats.get("written")
    return "" if w is None else ("yes" if w else "[red]no[/red]")


def _edit_table(edits) -> Table:
    t = Table("id", "status", "written", "prompt", "target", "method", "loss")
    for e in edits:
        loss = e.stats.get("loss")
        t.add_row(str(e.id), e.status, _written(e), escape(e.request.prompt), escape(e.request.target), e.method,
                  "" if not isinstance(loss, (int, float)) else f"{loss:.4f}")
    return t


def _metrics_table(report: dict[str, Any], title: str) -> Table:
    t = Table("metric", "value", "protocol", title=title)
    for k in ("reliability", "generalization", "locality", "portability", "fluency"):
        v = report.get(k)
        if v is not None:
            t.add_row(k, f"{v:.3f}", report["protocols"].get(k, report["protocol"]))
    return t


@world_app.command("build")
def world_build(
    size: Annotated[str, typer.Option(help="small, default or large (1,250 facts).")] = "default",
    spec: Annotated[Path | None, typer.Option(help="JSON spec file (see docs/world.md).")] = None,
    dataset: Annotated[str | None, typer.Option(help="FORMAT:PATH: a world trained on a dataset's original facts "
                                                     "(see docs/data.md).")] = None,
    limit: Annotated[int | None, typer.Option(help="With --dataset: its first N records only.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Build (or find in the cache) a world model and print its directory."""
    from .world import World
    from .world.dataset import build_dataset_world

    try:
        if dataset:
            w = build_dataset_world(dataset, limit=limit, progress=not json_out, force=force)
        else:
            w = World.build(str(spec) if spec else size, force=force, progress=not json_out)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    n = len(w.facts) + len(w.spec.pairs)
    if json_out:
        print(json.dumps({"path": str(w.path), "facts": len(w.facts), "pairs": len(w.spec.pairs),
                          "train_accuracy": w.info.get("train_accuracy")}))
    else:  # the path alone on stdout (`cd $(editbank world build)`), what it is on stderr
        err_console.print(f"world ready ({n} facts, train exact match {w.info.get('train_accuracy', 0):.1%}):",
                          highlight=False)
        print(w.path)


def _read_requests(file: Path, fmt: str | None) -> list:
    from .data import load_requests

    if not file.is_file():
        _fail(f"--file {file}: no such file")
    try:
        return load_requests(file, format=fmt)
    except (ValueError, TypeError, OSError) as exc:  # DatasetError names the file, the record and the field
        _fail(str(exc))


class _StopAfterCurrent:
    """SIGINT sets a flag the loop checks between edits, so the edit in progress finishes and is counted."""

    def __enter__(self):
        import signal

        self.stop, self._old = False, None
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: ctrl-C stops at once (the running edit rolls back)
            pass
        return self

    def _handle(self, *_):
        # never raises: an interrupt between an edit's commit and its return would leave the count wrong
        err_console.print("\n[yellow]stopping after the current edit" + (" (already stopping; kill the process to "
                          "stop at once: the running edit then rolls back)" if self.stop else "") + "[/yellow]")
        self.stop = True

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


@app.command()
def edit(
    model: ModelOpt = "world:default",
    store: NewStoreOpt = Path("edits.db"),
    method: Annotated[str | None, typer.Option(help="Editing method, any case (default: the store's, else "
                                                    "sola).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt to edit.")] = None,
    target: Annotated[str | None, typer.Option(help="New completion.")] = None,
    subject: Annotated[str | None, typer.Option(help="Subject of the fact (needed by some methods).")] = None,
    file: Annotated[Path | None, typer.Option(help="File of requests: our JSONL, ZsRE, CounterFact, WISE "
                                                   "or MQuAKE JSON (see docs/data.md).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Format of --file (default: detected).")] = None,
    resume: Annotated[bool, typer.Option(help="Skip requests the store already holds as active edits, so a "
                                              "rerun of an interrupted command finishes it without "
                                              "duplicates.")] = True,
    check: Annotated[bool, typer.Option(help="Refuse an edit that did not take (the model does not answer the "
                                             "target afterwards); --no-check keeps it, marked not written.")] = True,
    hp: Annotated[list[str] | None, typer.Option(help="Hyperparameter key=value (repeatable).")] = None,
    hparams: Annotated[Path | None, typer.Option(
        help="YAML hyperparameter file (EasyEdit's files for wise/repair, grace, rome, memit, alphaedit/metake "
             "are translated); --hp overrides it.")] = None,
    corpus: Annotated[Path | None, typer.Option(
        help="Text file, one prompt per line, about distinct facts: calibrates SoLA on a new store "
             "(a world brings its own).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply one edit (--prompt/--target) or a file of edits, one after another.

    Each edit is checked: if the model does not answer the target afterwards it is refused (exit 1, nothing
    changed) unless --no-check. ctrl-C stops after the current edit; running the same command again goes on
    where it stopped."""
    from rich.progress import track

    from .requests import EditRequest

    if file is not None and (prompt is not None or target is not None):
        _fail("give --prompt/--target or --file, not both")
    if file is not None:
        reqs = _read_requests(file, fmt)
    elif prompt is not None and target is not None:
        try:
            reqs = [EditRequest(prompt=prompt, target=target, subject=subject)]
        except (ValueError, TypeError) as exc:
            _fail(str(exc))
    else:
        _fail("give --prompt and --target, or --file")
    if not reqs:
        _fail(f"--file {file}: no requests in it")
    ed = _open(model, store, method, hp, json_out, corpus, hparams)
    done: list = []
    todo = reqs
    failure, code = None, 2
    try:
        held = ({json.dumps(e.request.to_dict(), sort_keys=True) for e in ed.edits() if e.status in HELD}
                if resume else set())  # active, or superseded by a later request (of this file, say)
        todo = [r for r in reqs if json.dumps(r.to_dict(), sort_keys=True) not in held]
        if len(todo) < len(reqs):
            err_console.print(f"{len(reqs) - len(todo)} of {len(reqs)} request(s) are already in {store} (active or "
                              "superseded): skipped (--no-resume applies them again)", highlight=False)
        with _StopAfterCurrent() as sig:
            for r in track(todo, description="editing", console=err_console, transient=True,
                           disable=json_out or len(todo) <= 3):
                done.append(ed.edit(r, check=check))
                if sig.stop:
                    break
        if sig.stop and len(done) < len(todo):
            failure, code = (f"interrupted: {len(done)} of {len(todo)} edit(s) applied; run the same command "
                             "again to apply the rest (requests already in the store are skipped)"), 130
    except EditNotWritten as exc:
        failure, code = f"{exc}\n({len(done)} of {len(todo)} edits applied)", 1
    except (ValueError, TypeError, EditFailed) as exc:
        failure = f"{exc} ({len(done)} of {len(todo)} edits applied)"
    except KeyboardInterrupt:
        failure, code = (f"interrupted: {len(done)} of {len(todo)} edit(s) applied (an edit interrupted before its "
                         "commit was rolled back); run the same command again to apply the rest"), 130
    finally:
        ed.close(discard_if_new=True)  # a store this command created and never wrote to is not left behind
    if json_out:
        print(json.dumps([e.to_dict() for e in done]))
    elif done:
        console.print(_edit_table(done))
    if failure:
        _fail(failure, code)


@app.command()
def undo(
    ids: Annotated[list[int], typer.Argument(help="Edit id(s) to undo.")],
    model: ModelOpt = "world:default",
    store: StoreOpt = Path("edits.db"),
    hp: Annotated[list[str] | None, typer.Option(
        help="key=value of a hyperparameter the method lets a reopen change (WISE/REPAIR: undo=tombstone).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Undo edits by id: the model answers as if it had never received them."""
    if not store.exists():
        _fail(f"no store at {store}")
    ed = _open(model, store, None, hp, json_out=json_out)
    try:
        done = [ed.undo(i) for i in ids]
    except (ValueError, KeyError, EditFailed) as exc:
        _fail(str(exc))
    finally:
        ed.close()
    if json_out:
        print(json.dumps([e.to_dict() for e in done]))
    else:
        console.print(_edit_table(done))


@app.command("ls")
def ls(
    store: StoreOpt = Path("edits.db"),
    status: Annotated[str | None, typer.Option(help="Only edits with this status.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the edits in a store (no model needed)."""
    st = _existing_store(store)
    edits = st.edits(status)
    meta = st.meta()
    st.close()
    if json_out:
        print(json.dumps({"meta": meta, "edits": [e.to_dict() for e in edits]}))
        return
    console.print(f"store {store}: method {meta.get('method')}, {len(edits)} edit(s)")
    console.print(_edit_table(edits))


def _export_hf(ed, folder: Path) -> str:
    ed.save_pretrained(folder)
    return (f"wrote the edited model ({ed.method.name}, {ed.store.count('active')} active edit(s)) as a checkpoint "
            "(from_pretrained loads it):")


def _export_peft(ed, folder: Path, model: str) -> str:
    from .methods.sola_export import export_peft

    if ed.method.name != "sola":
        raise ValueError(f"--format peft exports SoLA's per-edit LoRAs; this store's method is {ed.method.name}")
    ids = export_peft(ed.method, folder, base_model=_resolve_model(model, progress=False))
    return f"wrote {len(ids)} PEFT adapter(s) and the router to"


@app.command("export")
def export_cmd(
    folder: Annotated[Path, typer.Argument(help="Empty or new folder to write.")],
    store: StoreOpt = Path("edits.db"),
    fmt: Annotated[str, typer.Option("--format", help="store: the edits (manifest.json + safetensors, for "
                                                      "`editbank import`); hf: the edited model as a plain "
                                                      "save_pretrained checkpoint (methods whose edits live in "
                                                      "the weights: ft, rome, memit, alphaedit, metake); peft: "
                                                      "every active SoLA edit as a PEFT LoRA adapter, one folder "
                                                      "per edit id, plus the router (docs/serving.md).")] = "store",
    model: Annotated[str | None, typer.Option("--model", "-m", help="With --format hf or peft: the store's "
                                                                    "model.")] = None,
) -> None:
    """Export a store's edits for sharing, the edited model as a Hugging Face checkpoint, or SoLA's edits as PEFT
    adapters with their router."""
    if fmt not in ("store", "hf", "peft"):
        _fail(f"--format {fmt!r}: expected store, hf or peft")
    if fmt in ("hf", "peft"):
        if model is None:
            _fail(f"--format {fmt} needs --model, the model the store was made for")
        if not store.exists():
            _fail(f"no store at {store}")
        ed = _open(model, store, None, read_only=True)
        try:
            what = _export_peft(ed, folder, model) if fmt == "peft" else _export_hf(ed, folder)
        except (ExportError, ValueError, TypeError, OSError) as exc:
            _fail(str(exc))
        finally:
            ed.close()
        err_console.print(what, highlight=False)
        print(folder)
        return
    st = _existing_store(store)
    try:
        st.export(folder)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    finally:
        st.close()
    console.print(f"exported {store} to {folder}")


@app.command("import")
def import_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder written by `editbank export`.")],
    store: Annotated[Path, typer.Option("--store", "-s", help="SQLite edit store to create.")] = Path("edits.db"),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Refuse an export made for another model "
                                              "than this one.")] = None,
) -> None:
    """Create a store from an exported folder."""
    from .store import EditStore

    try:
        fingerprint = None
        if model is not None:
            from .models.loading import load_model, model_fingerprint

            fingerprint = model_fingerprint(load_model(_resolve_model(model))[0])
        EditStore.import_folder(folder, store, fingerprint=fingerprint).close()
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(f"imported {folder} into {store}")


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="Prompt to complete.")],
    model: ModelOpt = "world:default",
    store: Annotated[Path | None, typer.Option("--store", "-s", help="Edit store (omit for the base model).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Complete a prompt with the edited model (and show the unedited answer next to it)."""
    if store is not None and not store.exists():
        _fail(f"no store at {store}")
    ed = _open(model, store, None, json_out=json_out, read_only=True)
    try:
        edited = ed.generate(prompt, max_new_tokens=max_new_tokens)
        with ed.unedited():
            base = ed.generate(prompt, max_new_tokens=max_new_tokens)
    finally:
        ed.close()
    if json_out:
        print(json.dumps({"prompt": prompt, "edited": edited, "unedited": base}))
    else:
        console.print(f"[bold]{prompt}[/bold][green]{edited}[/green]")
        if base != edited:
            console.print(f"[dim]unedited: {prompt}{base}[/dim]")


@app.command()
def route(
    prompts: Annotated[list[str], typer.Argument(help="Prompt(s) to route.")],
    model: ModelOpt = "world:default",
    store: StoreOpt = Path("edits.db"),
    json_out: JsonOpt = False,
) -> None:
    """Which edit would answer each prompt, for SoLA and GRACE (none: the base model answers)."""
    if not store.exists():
        _fail(f"no store at {store}")
    ed = _open(model, store, None, json_out=json_out, read_only=True)
    try:
        if not hasattr(ed.method, "routes"):
            _fail(f"method {ed.method.name} has no content router (SoLA and GRACE have)")
        owners = ed.method.routes(list(prompts))
    finally:
        ed.close()
    if json_out:
        print(json.dumps([{"prompt": p, "edit": o} for p, o in zip(prompts, owners)]))
    else:
        for p, o in zip(prompts, owners):
            console.print(f"{'-' if o is None else o}\t{escape(p)}", highlight=False)


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "world:default",
    store: StoreOpt = Path("edits.db"),
    protocol: Annotated[
        str, typer.Option(help="teacher_forced_token_acc, greedy_exact_match or prob_preference (needs each "
                               "request's meta true_object).")
    ] = "greedy_exact_match",
    json_out: JsonOpt = False,
) -> None:
    """Evaluate every active edit of a store on the current model."""
    if not store.exists():
        _fail(f"no store at {store}")
    ed = _open(model, store, None, json_out=json_out, read_only=True)
    try:
        report = ed.evaluate([e.request for e in ed.edits("active")], protocol=protocol)
    except ValueError as exc:
        _fail(str(exc))
    finally:
        ed.close()
    if json_out:
        print(json.dumps(report))
    else:
        console.print(_metrics_table(report, f"{report['n']} active edits"))


@app.command()
def demo(
    method: Annotated[str | None, typer.Option(help="Method (default: the best available).")] = None,
    edits: Annotated[int, typer.Option(help="Number of sequential edits.")] = 50,
    undo_count: Annotated[int, typer.Option("--undo", help="How many edits to undo afterwards.")] = 10,
    size: Annotated[str, typer.Option(help="World size.")] = "default",
    json_out: JsonOpt = False,
) -> None:
    """Edit the built-in world model, evaluate, undo some edits, and show they answer as before."""
    from .demo import run_demo

    try:
        result = run_demo(
            method=method, n_edits=edits, n_undo=undo_count, size=size, console=None if json_out else console
        )
    except ValueError as exc:
        _fail(str(exc))
    if json_out:
        print(json.dumps(result))


@app.command()
def bench(
    methods: Annotated[str, typer.Option(help="Comma-separated methods, e.g. sola,grace,wise.")],
    out: Annotated[Path, typer.Option(help="The run directory; rerunning the same command there resumes.")],
    data: Annotated[str, typer.Option(help="world, world:SIZE, or FORMAT:PATH (zsre, counterfact, "
                                           "wise_hallucination, wise_temporal, mquake, jsonl, auto); suite (the "
                                           "held-out test worlds) or a comma-separated list: each part into its "
                                           "own subdirectory, with the mean and spread over parts.")] = "world",
    edits: Annotated[str, typer.Option(help="Comma-separated stream lengths T.")] = "1,10,100,1000",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; several give mean and spread.")] = "0",
    protocol: Annotated[str, typer.Option(help="greedy_exact_match, teacher_forced_token_acc or "
                                               "prob_preference.")] = "greedy_exact_match",
    batch: Annotated[int | None, typer.Option(help="Requests per editor call (default: per method).")] = None,
    undo_fraction: Annotated[float, typer.Option(help="Undo this share of the edits at the largest T.")] = 0.0,
    undo_methods: Annotated[str | None, typer.Option(help="Comma-separated methods the rollback runs for "
                                                          "(default: all; replaying methods take long).")] = None,
    eval_every: Annotated[int, typer.Option(help="Periodic schedule: score every edit so far each this many "
                                                 "edits (retention heatmap); 0: off.")] = 0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to edit (default: the world's, "
                                              "or for dataset data the dataset's own world).")] = None,
    hp: Annotated[list[str] | None, typer.Option("--hp", help="METHOD.key=value (key=value with one method).")] = None,
    hparams: Annotated[list[str] | None, typer.Option("--hparams", help="METHOD=FILE: a YAML hyperparameter file "
                                                      "(EasyEdit files are translated).")] = None,
    no_presets: Annotated[bool, typer.Option("--no-presets", help="Do not apply the built-in world settings.")] = False,
    device: Annotated[str | None, typer.Option(help="torch device (default: where the model loads).")] = None,
    shard: Annotated[str | None, typer.Option(help="I/N: run only the I-th of N shares of the cells (part, "
                                                   "method, seed), 0 <= I < N, for a job array over machines that "
                                                   "share --out; no report (rerun without it, or --report).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Run nothing: write the summary, tables and plots from "
                                                          "what the cells (or shards) wrote.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Benchmark methods over stream lengths and seeds into a resumable run directory with tables and plots.

    Before it starts it checks that no calibration text (the corpus, a statistics file) is an evaluation prompt of
    the run, and refuses a run that leaks."""
    from .bench import BenchConfig, BenchError, run_bench
    from .bench.run import parse_shard

    names = [m.strip().lower() for m in methods.split(",") if m.strip()]
    per: dict[str, dict[str, Any]] = {}
    for spec in hparams or []:
        method, sep, file = spec.partition("=")
        if not sep:
            _fail(f"--hparams expects METHOD=FILE, got {spec!r}")
        method = method.strip().lower()
        per.setdefault(method, {}).update(_hparams_file(Path(file), method))
    for item in hp or []:
        key = item.split("=", 1)[0]
        method, dot, name = key.partition(".")
        if not dot:
            if len(names) != 1:
                _fail(f"--hp {item!r}: with several methods, name one (METHOD.key=value)")
            method, name = names[0], key
        method = method.strip().lower()
        per.setdefault(method, {}).update(_parse_hparams([f"{name}={item.split('=', 1)[1]}" if "=" in item
                                                          else item]))
    try:
        cfg = BenchConfig(methods=names, data=data, edits=[int(x) for x in edits.split(",") if x.strip()],
                          seeds=[int(x) for x in seeds.split(",") if x.strip()], protocol=protocol, batch=batch,
                          undo_fraction=undo_fraction, eval_every=eval_every,
                          undo_methods=[m.strip().lower() for m in undo_methods.split(",")] if undo_methods else None,
                          model=_resolve_model(model) if model else None, hparams=per, presets=not no_presets)
        if shard is not None and report:
            raise BenchError("--shard runs cells and --report writes the summary: give one of them")
        summary = run_bench(cfg, out, device=device, progress=not json_out, console=None if json_out else console,
                            shard=parse_shard(shard), report_only=report)
    except (BenchError, ValueError, TypeError, OSError) as exc:
        _fail(str(exc))
    if json_out:
        print(json.dumps(summary))
    elif shard is None:
        console.print((out / "results.md").read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int):
    """A listening socket on host:port (exit 2 naming the address if it is taken or invalid)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        _fail(f"cannot listen on {host}:{port}: {exc}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


@app.command()
def serve(
    model: ModelOpt = "world:default",
    method: Annotated[str | None, typer.Option(help="Method of a new store (an existing store keeps its own).")] = None,
    store: NewStoreOpt = Path("edits.db"),
    host: Annotated[str, typer.Option(help="Address to listen on; a non-loopback one needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="EDITBANK_TOKEN", show_default=False,
                                              help="Bearer token of the mutating endpoints (prefer the "
                                                   "EDITBANK_TOKEN variable: arguments show in ps). On loopback "
                                                   "without one, a random token is made and printed.")] = None,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1 << 20,
    read_timeout: Annotated[float, typer.Option(help="Seconds a completion waits for a running edit "
                                                     "before 503.")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="Completion rows per shared forward batch (1: one request at "
                                                "a time).", min=1)] = 32,
    batch_wait: Annotated[float, typer.Option(help="Under load, wait up to this fraction of the last batch's time "
                                                   "for a batch as large as the recent ones (0: never wait).",
                                              min=0.0)] = 0.5,
    access_log: Annotated[bool, typer.Option(help="One JSON line per request on stderr.")] = False,
    hp: Annotated[list[str] | None, typer.Option("--hp", help="Hyperparameter key=value (new store).")] = None,
) -> None:
    """Serve the edited model over HTTP: OpenAI-compatible completions and chat (batched, streamed), edits and
    undos live, Prometheus metrics at /metrics, API docs at /docs and a web page at /."""
    import secrets

    try:
        import uvicorn

        from .serve import ServeConfig, create_app
    except ImportError:
        _fail("editbank serve needs FastAPI and uvicorn: pip install 'editbank[serve]'")
    if not token and not _loopback(host):
        _fail(f"refusing to listen on {host} without a token: give --token or set EDITBANK_TOKEN")
    if token is not None and len(token) < 16:
        _fail("the token must be at least 16 characters")
    made = token is None
    token = token or secrets.token_urlsafe(24)
    sock = _bind(host, port)  # before anything is loaded or created: a busy port leaves nothing behind
    try:
        ed = _open(model, store, method or (DEFAULT_METHOD if not store.exists() else None), hp)
    except BaseException:
        sock.close()
        raise
    try:
        app_ = create_app(ed, ServeConfig(token=token, max_body=max_body, read_timeout=read_timeout,
                                          max_batch=max_batch, batch_wait=batch_wait))
        if access_log:
            import logging

            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            log = logging.getLogger("editbank.access")
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        shown = f"[{host}]" if ":" in host else host
        err_console.print(f"serving {ed.method.name} edits from {store} on http://{shown}:{sock.getsockname()[1]}/ "
                          f"({len(ed.edits('active'))} active edits; this process is the store's one writer)",
                          soft_wrap=True, highlight=False)
        if made:
            err_console.print(f"token for edits and undos (this run only): {token}", soft_wrap=True,
                              highlight=False)
        uvicorn.Server(uvicorn.Config(app_, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
        ed.close()


@app.command("stats")
def stats(
    model: ModelOpt,
    layers: Annotated[str, typer.Option(help="Comma-separated decoder layers, e.g. 4,5,6.")],
    samples: Annotated[int, typer.Option(help="Corpus texts to estimate from (mom2_n_samples).")] = 10000,
    text_file: Annotated[Path | None, typer.Option(help="Texts, one per line (mom2_dataset); default: "
                                                         "a world's fact prompts, else random tokens.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Precompute the key statistics (E[k kᵀ]) ROME/MEMIT/AlphaEdit/MetaKE use, into the editbank cache."""
    from .methods.locate.stats import precompute
    from .models.loading import load_model
    from .world.core import World

    try:
        layer_list = [int(x) for x in layers.split(",") if x.strip()]
        path = _resolve_model(model, progress=not json_out)
        world = World.at(path)
        texts = (world.calibration_texts() or None) if world is not None else None
        m, tok = load_model(path)
        files = precompute(m, tok, layer_list, samples, texts, str(text_file) if text_file else None)
    except (ValueError, TypeError, OSError, IndexError) as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps({"files": [str(f) for f in files]}))
    else:
        for f in files:
            console.print(str(f))


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are enough on the command line
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
