"""Editor: the session object tying a model, one method and a store; transactional edit and undo."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track

from ._version import __version__
from .methods import base as mbase
from .models.loading import load_model, model_fingerprint
from .models.registry import arch_of
from .requests import EditRequest
from .store import Edit, EditStore, StoreMismatchError
from .tokens import pad_id, pair_ids, prompt_ids

DEFAULT_METHOD = "sola"  # for a new store opened without a method
HELD = ("active", "superseded")  # edits whose effect the method holds (superseded ones switched off)


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@contextmanager
def _seeded(seed: int, cpu: bool = False) -> Iterator[None]:
    """Deterministic randomness for one edit without disturbing the caller's RNG. `cpu`: the model is on the CPU,
    so only the CPU generator is seeded (`torch.manual_seed` also queues lazy seeds for every accelerator backend,
    about 1 ms a call, which a replay of many edits pays once per call)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if cpu:
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        yield


class Editor:
    """A model + tokenizer + one editing method + an edit store.

    Every `edit` and `undo` is transactional: on any failure the model weights, the method state
    and the store are exactly as before, and the exception says what went wrong.
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str | None = None,
        store: str | Path | EditStore | None = None,
        *,
        seed: int = 0,
        snapshot_every: int = 10,
        progress: bool = False,
        corpus: list[str] | None = None,
        stats_corpus: list[str] | None = None,
        paraphrases: list[list[str]] | None = None,
        paraphrase_subjects: list[str | None] | None = None,
        read_only: bool = False,
        **hparams: Any,
    ) -> None:
        for name, texts in (("corpus", corpus), ("stats_corpus", stats_corpus)):
            if texts is not None and not (isinstance(texts, list) and all(isinstance(c, str) for c in texts)):
                raise TypeError(f"{name} must be a list of prompt strings")
        if paraphrases is not None and not (isinstance(paraphrases, list) and all(
                isinstance(g, list) and all(isinstance(c, str) for c in g) for g in paraphrases)):
            raise TypeError("paraphrases must be a list of groups, each a list of prompt strings")
        if paraphrase_subjects is not None and not (
                isinstance(paraphrase_subjects, list) and paraphrases is not None
                and len(paraphrase_subjects) == len(paraphrases)
                and all(s is None or isinstance(s, str) for s in paraphrase_subjects)):
            raise TypeError("paraphrase_subjects must be a list of str or None, one per paraphrase group")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError("seed must be an int")
        if not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError("snapshot_every must be a positive int")
        self.model, self.tokenizer = model, tokenizer
        self.seed, self.snapshot_every = seed, snapshot_every
        self.progress = progress  # show a progress bar on long replays (undo of weight-editing methods)
        self.arch = arch_of(model)
        self.read_only = read_only  # generate and evaluate only: no writer lock, nothing written to the store
        own_store = not isinstance(store, EditStore)
        if read_only and own_store and store is not None and not Path(store).exists():
            raise ValueError(f"no store at {store} (a read-only editor opens an existing store)")
        self.store = EditStore(store) if own_store else store
        try:
            if not read_only:
                self.store.lock_for_writing()
            self._setup(model, tokenizer, method, hparams)
            self.method.corpus = corpus
            self.method.stats_corpus = stats_corpus
            self.method.paraphrases = paraphrases
            self.method.paraphrase_subjects = paraphrase_subjects
        except BaseException:
            self._release()
            if own_store:
                self.store.discard_if_new()  # a store this failed open created holds nothing: leave no file
            raise

    def _setup(self, model, tokenizer, method: str | None, hparams: dict[str, Any]) -> None:
        method = mbase.get_method(method).name if method is not None else None
        known = self.store.get_meta("method")
        if method is not None and known is not None and method != known:
            raise StoreMismatchError(f"store {self.store.path} holds edits of method {known!r}, not {method!r}")
        name = method if method is not None else (known or DEFAULT_METHOD)
        cls = mbase.get_method(name)
        stored = self.store.get_meta("hparams")
        if stored is not None:
            for k, only in cls.retired_hparams.items():  # a field that no longer exists: gone, if it held its value
                value = stored.pop(k, only)
                if value != only:
                    raise StoreMismatchError(f"store {self.store.path} was made with {k}={value!r}, which this "
                                             f"version of {name!r} no longer has")
            stored = {**cls.stored_defaults, **stored}
        if stored is not None and hparams:
            base = dataclasses.asdict(mbase.build_hparams(cls.Hparams, stored))
            changed = {k: v for k, v in hparams.items() if base.get(k, object()) != v}
            fixed = sorted(set(changed) - cls.reopen_hparams)
            if fixed:
                raise ValueError(
                    f"store {self.store.path} was created with other hyperparameters; cannot change "
                    f"{fixed} on reopen (use a new store)"
                    + (f"; only {sorted(cls.reopen_hparams)} may change" if cls.reopen_hparams else "")
                )
            stored = {**stored, **changed}
        hp = mbase.build_hparams(cls.Hparams, stored if stored is not None else hparams)
        model.eval()  # dropout off: edits, evaluation and replay must be deterministic
        self._grad_flags = {pname: p.requires_grad for pname, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.fingerprint = model_fingerprint(model)
        self.method: mbase.Method = cls(model, tokenizer, self.arch, hp)
        self.store.bind(self.fingerprint, name, dataclasses.asdict(hp), __version__, write=not self.read_only)
        self._base_weights = {k: p.detach().clone() for k, p in self.method.touched_parameters().items()}
        self._base_cache: dict[tuple[str, str, str], Any] = {}
        self._saved: dict[str, tuple[torch.Tensor, int]] = {}  # state tensors as last written to the store
        self.method.request_of = lambda edit_id: self.store.get_edit(edit_id).request
        self.method.attach()
        if not self.method.edits_in_weights:
            model.save_pretrained = self._refuse_checkpoint  # the base weights alone would lose every edit
        state = self.store.get_state()
        if state is not None:
            self._load_tensors(*state)

    @classmethod
    def open(
        cls,
        model,
        method: str | None = None,
        store: str | Path | EditStore | None = None,
        *,
        tokenizer=None,
        dtype=None,
        device=None,
        device_map=None,
        seed: int = 0,
        snapshot_every: int = 10,
        progress: bool = False,
        corpus: list[str] | None = None,
        stats_corpus: list[str] | None = None,
        paraphrases: list[list[str]] | None = None,
        paraphrase_subjects: list[str | None] | None = None,
        read_only: bool = False,
        **hparams: Any,
    ) -> Editor:
        """Open an editor on a local model directory, a built World, or a model object (+ tokenizer).

        `corpus`: prompts about distinct facts, typical of the model's domain, for methods that calibrate on
        them; a World (or a world's directory) supplies its calibration part (`World.fact_prompts()`), which no
        `World.edit_requests` rephrase or probe is in. Never pass prompts you will evaluate on.
        `stats_corpus`: texts the locate methods take key statistics from (default: `corpus`); a World supplies
        every training prompt of its calibration part (`World.calibration_texts()`).
        `paraphrases`: groups of prompts, each one fact worded several ways, none evaluated (SoLA learns from them
        which directions of its key are wording); a World supplies its calibration part's
        (`World.calibration_paraphrases()`). `paraphrase_subjects`: each group's subject (None where unknown), for
        SoLA's subject gate to calibrate on groups of one subject; a World supplies them with its groups.
        `read_only`: only generate and evaluate; the store is not locked (a store another process writes, such as
        a running `editbank serve`, can be read) and `edit` / `undo` refuse.
        """
        if method is not None:
            mbase.get_method(method)  # fail on an unknown method before loading anything
        if hasattr(model, "path") and not isinstance(model, (str, Path)) and not hasattr(model, "config"):
            model = model.path  # a World
        if isinstance(model, (str, Path)) and (corpus is None or paraphrases is None):
            from .world.core import World

            world = World.at(model)
            if world is not None and paraphrases is None:
                paraphrases = world.calibration_paraphrases() or None
                if paraphrases is not None and paraphrase_subjects is None:
                    paraphrase_subjects = world.calibration_paraphrase_subjects()
            if world is not None and corpus is None:
                corpus = world.fact_prompts() or None  # a dataset world has none
                if corpus is None:
                    warnings.warn(f"world {world.name!r} was built from a dataset and has no calibration part: the "
                                  "method gets no corpus (SoLA samples texts from the model, the locate methods "
                                  "take statistics on random tokens); pass corpus= from records held out of your "
                                  "run (editbank.leaks.calibration_corpus)", stacklevel=2)
                stats_corpus = stats_corpus or world.calibration_texts() or None
        model, tokenizer = load_model(model, tokenizer, dtype=dtype, device=device, device_map=device_map)
        return cls(
            model, tokenizer, method, store, seed=seed, snapshot_every=snapshot_every, progress=progress,
            corpus=corpus, stats_corpus=stats_corpus, paraphrases=paraphrases,
            paraphrase_subjects=paraphrase_subjects, read_only=read_only, **hparams,
        )

    # -- context manager ----------------------------------------------------------------------
    def close(self, discard_if_new: bool = False) -> None:
        """Give the model back as it came (base weights, no hooks) and close the store.

        `discard_if_new`: also delete the store file if this editor created it and no edit was committed (a
        command that failed before its first edit leaves nothing behind)."""
        self._release()
        if discard_if_new:
            self.store.discard_if_new()
        else:
            self.store.close()

    def _release(self) -> None:
        """Undo what the editor did to the model object: weights, hooks, requires_grad flags."""
        if hasattr(self, "_base_weights"):
            self._set_weights(self._base_weights)
        if hasattr(self, "method"):
            self.method.detach()
        own = vars(self.model).get("save_pretrained")
        if getattr(own, "__self__", None) is self:  # ours only (another editor's guard stays)
            del self.model.save_pretrained
        for name, p in self.model.named_parameters():
            p.requires_grad_(getattr(self, "_grad_flags", {}).get(name, p.requires_grad))

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- validation ---------------------------------------------------------------------------
    def validate(self, request: Any) -> EditRequest:
        """Check a request against this model and method (raises ValueError/TypeError naming the field)."""
        if isinstance(request, dict):
            request = EditRequest.from_dict(request)
        if not isinstance(request, EditRequest):
            raise TypeError(f"edit expects EditRequest objects, got {type(request).__name__}")
        p, t = pair_ids(self.tokenizer, request.prompt, request.target)
        if not t:
            raise ValueError(f"EditRequest.target {request.target!r} tokenizes to nothing")
        limit = _max_positions(self.model.config)
        n = len(p) + len(t)
        if limit is not None and n > limit:
            raise ValueError(
                f"the request is too long: prompt + target is {n} tokens ({len(p)} + {len(t)}), the model's context "
                f"is {limit}"
            )
        if self.method.needs_subject and request.subject is None:
            raise ValueError(f"EditRequest.subject is required by method {self.method.name!r}")
        return request

    # -- edit / undo --------------------------------------------------------------------------
    def pretrain(self, requests: EditRequest | Iterable[EditRequest]) -> Any:
        """Do the part of editing `requests` that needs only the frozen base model, changing nothing, for a later
        `edit(requests, pretrained=...)`: a server runs it while other threads keep generating, then holds the
        model only for the short `edit`. None where the method cannot (`Method.trains_beside_readers`). The
        edit it feeds is bitwise the edit computed in one go."""
        self._writable()
        if not self.method.trains_beside_readers:
            return None
        single = isinstance(requests, (EditRequest, dict))
        reqs = [self.validate(r) for r in ([requests] if single else list(requests))]
        return self.method.pretrain(reqs)

    def edit(self, requests: EditRequest | Iterable[EditRequest], *, check: bool = True,
             pretrained: Any = None) -> Edit | list[Edit]:
        """Apply one request (returns an Edit) or a batch (returns a list of Edits).

        After writing, each request is tested as the method's reliability is (greedy exact match of the target
        after the prompt, one batched forward) and the verdict is kept in the edit's stats (`written`). With
        `check=True` (the default) an edit that did not take raises `EditNotWritten`, naming each such request
        with its final loss and what the model answers now, and nothing changes; `check=False` keeps it, stored
        with `written: false` (a benchmark, where failures are part of the measurement). `pretrained` is what
        `pretrain` returned for these requests."""
        if not isinstance(check, bool):
            raise TypeError("check must be a bool")
        self._writable()
        single = isinstance(requests, (EditRequest, dict))
        reqs = [self.validate(r) for r in ([requests] if single else list(requests))]
        if not reqs:
            raise ValueError("edit needs at least one request")
        ckpt = self._checkpoint()
        try:
            with self.store.transaction():
                first = self.store.add_edit(reqs[0], self.method.name)
                edits = [first] + [self.store.add_edit(r, self.method.name, first.id) for r in reqs[1:]]
                t0 = time.perf_counter()
                with _seeded(self._batch_seed(reqs), self._on_cpu()), torch.enable_grad(), \
                        self.method.pretrained(pretrained):
                    stats = self.method.apply([mbase.EditItem(e.id, e.request) for e in edits])
                elapsed = time.perf_counter() - t0
                state = self._state_tensors()  # once per call: checked here, saved below
                unchanged = self._check_finite(stats, edits, state[0])
                written = self._verdicts(edits, stats)
                if check and not all(w is not False for w in written):
                    raise self._not_written(edits, stats, written)
                drift = self._weight_drift()
                for e, s, ok in zip(edits, stats, written):
                    e.stats = {**s, "seconds": elapsed / len(edits), "written": ok, **drift}
                    self.store.update_edit(e.id, stats=e.stats)
                    self.store.put_artifacts(e.id, self.method.artifacts(e.id))
                    for older in s.get("supersedes", []):
                        self.store.update_edit(older, status="superseded")
                # counted since the last snapshot: a multiple-of-N test skips multiples under batch calls
                due = self.store.count_after(max(self.store.snapshot_ids(), default=0)) >= self.snapshot_every
                self._save_state(snapshot=self.method.snapshots and due, state=state, unchanged=unchanged)
        except BaseException:
            self._restore(ckpt)
            self._saved = {}  # the transaction rolled back: the store may not hold what was last written
            raise
        return edits[0] if single else edits

    @torch.no_grad()
    def _weight_drift(self) -> dict[str, Any]:
        """For methods that write weights: ||W - W0|| / ||W0|| (Frobenius) of each written parameter after this
        call, as `weight_drift` in every edit's stats (long streams of locate-then-edit collapse as it grows)."""
        params = self.method.touched_parameters()
        if not params:
            return {}
        out = {}
        for k, p in params.items():
            w0 = self._base_weights[k]
            out[k] = round(float((p.detach().float() - w0.float()).norm() / w0.float().norm().clamp_min(1e-12)), 6)
        return {"weight_drift": out}

    def _on_cpu(self) -> bool:
        return next(self.model.parameters()).device.type == "cpu"

    def _batch_seed(self, requests: list[EditRequest]) -> int:
        """The torch seed an editor call runs under: from the requests and `seed`, never from edit ids, so a replay
        and a fresh editor fed the same requests draw the same numbers (built-in methods seed themselves the same
        way and use no global randomness; this covers a method that does)."""
        return mbase.stable_seed(self.seed, *((r.prompt, r.target) for r in requests))

    def _writable(self) -> None:
        if self.read_only:
            raise ValueError("this editor was opened read-only (read_only=True): it cannot edit or undo")

    def _verdicts(self, edits: list[Edit], stats: list[dict[str, Any]]) -> list[bool | None]:
        """Each edit of a call just applied: does it take (`_written`)? An edit a later request of the same call
        superseded cannot answer; it is not checked (None)."""
        gone = {o for s in stats for o in s.get("supersedes", [])} & {e.id for e in edits}
        live = [e for e in edits if e.id not in gone]
        verdict = dict(zip((e.id for e in live), self._written(live)))
        return [verdict.get(e.id) for e in edits]

    def _written(self, edits: list[Edit]) -> list[bool]:
        """Does the model now answer each edit's target after its prompt (greedy exact match)?"""
        from .evaluate.metrics import score_pairs

        if not edits:
            return []
        scores = score_pairs(self, [(e.request.prompt, e.request.target) for e in edits], "greedy_exact_match")
        return [s == 1.0 for s in scores]

    def _not_written(self, edits: list[Edit], stats: list[dict[str, Any]], written: list[bool | None]
                     ) -> mbase.EditNotWritten:
        failed = [(e, s) for e, s, ok in zip(edits, stats, written) if ok is False]
        n = max(len(pair_ids(self.tokenizer, e.request.prompt, e.request.target)[1]) for e, _ in failed)
        answers = self.generate([e.request.prompt for e, _ in failed], max_new_tokens=n + 2)
        failures = [{"prompt": e.request.prompt, "target": e.request.target, "loss": s.get("loss"), "answer": a}
                    for (e, s), a in zip(failed, answers)]
        lines = [f"  {f['prompt']!r} -> {f['target']!r}: the model answers {f['answer']!r}"
                 + (f" (final loss {f['loss']:.3g})" if isinstance(f.get("loss"), float) else "") for f in failures]
        return mbase.EditNotWritten(
            f"{len(failures)} of {len(edits)} request(s) did not take, so nothing was changed:\n" + "\n".join(lines)
            + "\n(other hyperparameters may write it; check=False / --no-check keeps an edit that did not take)",
            failures)

    def undo(self, edit_id: int) -> Edit:
        """Revert one edit: the model behaves as if it had never received it, and the edits the undo had to
        recompute carry the stats of a stream without it (`_restat`)."""
        self._writable()
        edit = self.store.get_edit(edit_id)
        if edit.status not in ("active", "superseded"):
            raise ValueError(f"edit {edit_id} is {edit.status}; nothing to undo")
        ckpt = self._checkpoint()
        try:
            with self.store.transaction():
                self._unlink_supersedes(edit)
                self.store.drop_snapshots_from(edit.id)  # they hold the edit (the replay takes new ones)
                if not self.method.remove(edit.id):
                    rewritten = self.method.undo_in_place(edit.id, self.store.get_edit, self.store.artifacts)
                    if rewritten is None:
                        carry = self.method.replay_carry()
                        redone = self._replay(exclude=edit.id)
                        self.method.replay_restore(carry, edit.id, edit.request)
                    else:
                        for e, (tensors, _) in rewritten.items():
                            self.store.put_artifacts(e, tensors, replace=True)
                        redone = {e: stats for e, (_, stats) in rewritten.items()}
                    self._restat(redone)
                self.store.update_edit(edit.id, status="reverted")
                self._save_state(snapshot=False)
        except BaseException:
            self._restore(ckpt)
            self._saved = {}
            raise
        return self.store.get_edit(edit.id)

    def _restat(self, redone: dict[int, dict[str, Any]]) -> None:
        """The edits an undo recomputed (in place, or by a replay: the edits after the undone one and those of its
        call) get the stats of their recomputation, with what they supersede (the statuses follow: an edit that no
        recomputed edit supersedes any more answers again and is active). `written` is a call's verdict: a replay
        checks it after each call, as the edits' own calls did; an undo in place keeps the verdict of the edit's own
        call (a check after the undo would also judge later edits, which a fresh stream's check does not). The
        call's `seconds` and `weight_drift` stay."""
        edits = [self.store.get_edit(e) for e in redone]
        now = {o for e in edits for o in redone[e.id].get("supersedes", [])}
        for e in edits:
            for o in e.stats.get("supersedes", []):
                if o not in now and self.store.get_edit(o).status == "superseded":
                    self.store.update_edit(o, status="active")
        for o in now:
            self.store.update_edit(o, status="superseded")
        for e in edits:
            stats = {**redone[e.id], **{k: e.stats[k] for k in ("seconds", "weight_drift") if k in e.stats}}
            stats.setdefault("written", e.stats.get("written"))
            self.store.update_edit(e.id, stats=stats)

    def _unlink_supersedes(self, edit: Edit) -> None:
        """Take `edit` out of its supersede chain before it is undone.

        An active edit's superseded predecessors come back (before any replay, so that it includes them);
        a superseded edit hands its predecessors to the edit that superseded it, which keeps covering them.
        """
        older = [o for o in edit.stats.get("supersedes", []) if self.store.get_edit(o).status == "superseded"]
        if edit.status == "active":
            for o in older:
                self.store.update_edit(o, status="active")
            return
        for newer in self.store.edits():
            if edit.id in newer.stats.get("supersedes", []) and newer.status in ("active", "superseded"):
                chain = [o for o in newer.stats["supersedes"] if o != edit.id] + older
                self.store.update_edit(newer.id, stats={**newer.stats, "supersedes": chain})
                return

    def edits(self, status: str | None = None) -> list[Edit]:
        return self.store.edits(status)

    def _replay(self, exclude: int) -> dict[int, dict[str, Any]]:
        """Rebuild from the nearest snapshot before `exclude` and re-apply later active edits; returns the stats
        each re-applied edit of `exclude`'s call or a later one got from its call, with the call's `written`
        verdict."""
        snap = self.store.latest_snapshot_before(exclude)
        start = 0
        if snap is None:
            self.method.reset()
            self._set_weights(self._base_weights)
        else:
            start, tensors, meta = snap
            self._load_tensors(tensors, meta, upto=start)
        # superseded edits are replayed too (their successors supersede them again), so that undoing a
        # successor later finds them in the method's state
        todo = [e for e in self.store.edits() if e.status in HELD and e.id > start and e.id != exclude]
        call = self.store.get_edit(exclude).batch  # the undone edit's call: replayed without it
        groups: dict[int, list[Edit]] = {}
        for e in todo:
            groups.setdefault(e.batch, []).append(e)
        redone: dict[int, dict[str, Any]] = {}
        since = 0  # edits replayed since the last snapshot: the replay snapshots as the edits did, so the next
        # undo of a later edit replays from near it again
        for group in track(
            groups.values(), description="replaying edits", total=len(groups),
            disable=not (self.progress and len(groups) > 1), transient=True, console=Console(stderr=True),
        ):
            work = self.method.replay_work(group, self.store.artifacts)  # stored results it may take back
            with _seeded(self._batch_seed([e.request for e in group]), self._on_cpu()), torch.enable_grad(), \
                    self.method.pretrained(work):
                stats = self.method.apply([mbase.EditItem(e.id, e.request) for e in group])
            self._check_finite(stats, group, tensors={})  # the state's tensors once, after the loop
            if group[-1].id > exclude or group[0].batch == call:  # (earlier calls come back as they were, bitwise)
                for e, st, ok in zip(group, stats, self._verdicts(group, stats)):
                    redone[e.id] = {**st, "written": ok}
            for e in group:  # keep the stored artifacts true to the rebuilt state
                self.store.put_artifacts(e.id, self.method.artifacts(e.id), replace=True)
            since += len(group)
            if self.method.snapshots and since >= self.snapshot_every and group[-1].id != todo[-1].id:
                self.store.put_snapshot(group[-1].id, *self._state_tensors())
                since = 0
        self._check_finite([], [])
        return redone

    # -- state handling -----------------------------------------------------------------------
    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        mt, meta = self.method.state_dict()
        tensors = {f"method.{k}": v for k, v in mt.items()}
        tensors.update({f"weights.{k}": p for k, p in self.method.touched_parameters().items()})
        return tensors, meta

    def _load_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], upto: int | None = None) -> None:
        """Load a saved state (`upto`: a snapshot's, taken after edit `upto`: of the edits held now, those up to
        it were held then; a later undo of an earlier edit dropped the snapshot)."""
        mt = {k[len("method.") :]: v for k, v in tensors.items() if k.startswith("method.")}
        wt = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
        self.method.reset()
        self.method.load_state_dict(mt, meta)
        if self.method.state_in_artifacts:
            held = (e for e in self.store.edits() if e.status in HELD and (upto is None or e.id <= upto))
            self.method.load_artifacts((e.id, self.store.artifacts(e.id)) for e in held)
        self._set_weights(wt)

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = self.method.touched_parameters()
        unknown = set(weights) - set(params)
        if unknown:
            raise ValueError(f"stored weights {sorted(unknown)} are not parameters this method edits")
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))

    def _save_state(self, snapshot: bool, state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                    unchanged: set[str] | None = None) -> None:
        """Write the state (`unchanged`: `_unchanged` of its tensors, when the caller has it already)."""
        tensors, meta = state or self._state_tensors()
        self.store.put_state(tensors, meta, self._unchanged(tensors) if unchanged is None else unchanged)
        self._saved = {k: (t, t._version) for k, t in tensors.items()}
        if snapshot:
            self.store.put_snapshot(self.store.last_id("active"), tensors, meta)

    def _unchanged(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """The names whose tensor is the one last saved: the same object at the same version counter (references
        are kept, so a new tensor can never reuse a saved one's identity)."""
        return {k for k, t in tensors.items()
                if k in self._saved and self._saved[k][0] is t and self._saved[k][1] == t._version}

    def _checkpoint(self) -> tuple[Any, dict[str, torch.Tensor]]:
        weights = {k: p.detach().clone() for k, p in self.method.touched_parameters().items()}
        return self.method.checkpoint(), weights

    def _restore(self, ckpt) -> None:
        state, weights = ckpt
        self.method.restore(state)
        self._set_weights(weights)

    def _check_finite(self, stats: list[dict[str, Any]], edits: list[Edit],
                      tensors: dict[str, torch.Tensor] | None = None) -> set[str]:
        """Raise EditFailed on a non-finite stat or state tensor; return the names of `tensors` unchanged since the
        last save (not read again: they were checked then), which the save that follows can reuse."""
        if len(stats) != len(edits):
            raise mbase.EditFailed(f"method returned {len(stats)} results for {len(edits)} edits")
        for e, s in zip(edits, stats):
            for k, v in s.items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise mbase.EditFailed(f"edit of {e.request.prompt!r} failed: {k} is {v}")
        if tensors is None:
            tensors = self._state_tensors()[0]
        unchanged = self._unchanged(tensors)  # checked when they were saved: the check stays flat as state grows
        for name, t in tensors.items():  # the written weights and the method's state
            if name not in unchanged and t.is_floating_point() and not torch.isfinite(t).all():
                what = name.replace("weights.", "", 1) if name.startswith("weights.") else \
                    f"method state {name.removeprefix('method.')}"
                raise mbase.EditFailed(f"edit produced non-finite values in {what}")
        return unchanged

    # -- getting the edited model out ---------------------------------------------------------
    def _check_exportable(self) -> None:
        """Raise ExportError if a plain checkpoint of the model would lose edits (routed edits are held)."""
        held = 0 if self.method.edits_in_weights else self.store.count("active")
        if held:
            raise mbase.ExportError(
                f"{self.method.name}'s {held} edit(s) live in routed side state, not in the model's weights, so "
                "save_pretrained would write the unedited base model; keep the store (Editor.open(model, "
                "store=...) reloads the edits), share it with `editbank export`, or use a method whose edits live "
                "in the weights (ft, rome, memit, alphaedit, metake) to get a plain checkpoint")

    def _refuse_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._check_exportable()
        type(self.model).save_pretrained(self.model, *args, **kwargs)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the edited model and its tokenizer as a plain Hugging Face checkpoint (`from_pretrained` loads it).

        Only for methods whose edits live in the weights (`Method.edits_in_weights`); a routed method's edits
        (SoLA, GRACE, WISE, REPAIR) raise `ExportError` instead of silently writing the base model."""
        out = Path(folder)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty folder")
        self._check_exportable()  # a routed method with no edit held: the base model is the edited model
        out.mkdir(parents=True, exist_ok=True)
        type(self.model).save_pretrained(self.model, out)
        self.tokenizer.save_pretrained(out)
        return out

    # -- running the edited model -------------------------------------------------------------
    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Inside the block the model behaves as the unedited base model."""
        params = self.method.touched_parameters()
        current = {k: p.detach().clone() for k, p in params.items()}
        self._set_weights(self._base_weights)
        try:
            with self.method.disabled():
                yield
        finally:
            self._set_weights(current)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask=None, query_index=None) -> torch.Tensor:
        """Forward pass with routing at `query_index` (default: the last token of each row)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if query_index is None:
            query_index = attention_mask.sum(1) - 1
        start = attention_mask.to(self.device).long().argmax(1)  # the first real token (left padding)
        route = mbase.Route(query_index=query_index.to(self.device), query_start=start)
        with self.method.routing(route):
            return self.model(input_ids=input_ids, attention_mask=attention_mask.to(self.device)).logits

    @torch.no_grad()
    def generate(
        self, prompts: str | list[str], max_new_tokens: int = 16, **kwargs: Any
    ) -> str | list[str]:
        """Greedy continuation(s) of the prompt(s); a routing decision taken on the prompt is kept."""
        ids = self.generate_ids(prompts, max_new_tokens, **kwargs)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        return texts[0] if isinstance(prompts, str) else texts

    @torch.no_grad()
    def generate_ids(self, prompts: str | list[str], max_new_tokens: int = 16, **kwargs: Any) -> list[list[int]]:
        """Token ids of the greedy continuations (eos and what follows removed)."""
        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [prompt_ids(self.tokenizer, p) for p in plist]
        return self.generate_rows(rows, max_new_tokens, **kwargs)[0]

    @torch.no_grad()
    def generate_rows(
        self, rows: list[list[int]], max_new_tokens: int = 16, streamer: Any = None, logits: bool = False,
        **kwargs: Any,
    ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Continuations of prompts given as token ids, left-padded into one batch, each row routed on its own.

        Returns each row's new token ids (eos and what follows removed) and, with `logits`, each row's raw
        next-token logits at every generated step (`[steps, vocab]`, float32 on the CPU). `streamer` gets
        transformers' streamer calls (`put` with the prompt batch, then each step's tokens; `end`)."""
        if not rows:
            return [], ([] if logits else None)
        if kwargs.get("num_beams", 1) != 1:
            raise ValueError("beam search is not supported: routing decisions are kept per prompt row")
        width = max(len(r) for r in rows)
        pid = pad_id(self.tokenizer)
        ids = torch.full((len(rows), width), pid, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        n_rows = len(rows) * int(kwargs.get("num_return_sequences", 1))  # generate repeats each prompt row
        starts = torch.tensor([width - len(r) for r in rows], device=self.device)
        starts = starts.repeat_interleave(n_rows // len(rows))  # generate repeats each prompt row
        route = mbase.Route(query_index=torch.full((n_rows,), width - 1, device=self.device), query_start=starts,
                            keep_decisions=True)
        kwargs.setdefault("do_sample", False)
        if logits:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with self.method.routing(route):
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pid,
                streamer=streamer,
                **kwargs,
            )
        seqs = out.sequences if logits else out
        eos = self.tokenizer.eos_token_id
        result = []
        for row in seqs[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            result.append(row)
        if not logits:
            return result, None
        steps = torch.stack([x.float().cpu() for x in out.logits], 1)  # [rows, steps, vocab]
        return result, [steps[i, : len(r)] for i, r in enumerate(result)]

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, requests: list[EditRequest], protocol: str = "teacher_forced_token_acc", **kw: Any):
        """Reliability / generalization / locality (/ portability, fluency) of `requests` on this model.

        Warns (`editbank.leaks.LeakWarning`) when a rephrase or probe it scores is in the method's corpus."""
        from .evaluate.metrics import evaluate
        from .leaks import warn_leaks

        warn_leaks([*(self.method.corpus or []), *(self.method.stats_corpus or []),
                    *(p for g in self.method.paraphrases or [] for p in g)], requests)

        return evaluate(self, requests, protocol=protocol, **kw)

