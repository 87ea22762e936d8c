"""Shared reader machinery: one error type, field accessors that name file/record/field, request building."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..requests import EditRequest

_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file, the record (or line) and the field."""


class DatasetWarning(UserWarning):
    """Records were skipped because they hold no usable edit (e.g. a blank target in published ZsRE)."""


class SkipRecord(Exception):
    """Raised by a converter for a record with no usable edit; the reader skips it and warns once per file."""


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


class Record:
    """One JSON object of a dataset file, with typed accessors whose errors say where the problem is."""

    def __init__(self, data: Any, source: str, index: int, unit: str = "record", prefix: str = "") -> None:
        self.source, self.index, self.unit, self.prefix = source, index, unit, prefix
        if not isinstance(data, dict):
            raise self.error(None, f"expected a JSON object, got {json_type(data)}")
        self.data: dict[str, Any] = data

    def where(self, key: str | None = None) -> str:
        """`file: record N` or `file: record N: field 'a.b'` (JSONL files say `line N`)."""
        loc = f"{self.source}: {self.unit} {self.index}"
        return loc if key is None else f"{loc}: field '{self.prefix}{key}'"

    def error(self, key: str | None, message: str) -> DatasetError:
        return DatasetError(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def raw(self, key: str) -> Any:
        """The value of a required field, of any type."""
        if key not in self.data:
            raise self.error(key, "missing")
        return self.data[key]

    def text(self, key: str) -> str:
        """A required string field."""
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {json_type(value)}")
        return value

    def texts(self, key: str, required: bool = True) -> list[str]:
        """A field holding a string or a list of strings, as a list ([] when absent and not required)."""
        if not required and not self.has(key):
            return []
        value = self.raw(key)
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a string or a list of strings, got {json_type(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{i}]", f"expected a string, got {json_type(item)}")
        return list(value)

    def obj(self, key: str) -> Record:
        """A required nested object, as a Record whose errors name `key.field`."""
        value = self.raw(key)
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object, got {json_type(value)}")
        return Record(value, self.source, self.index, self.unit, f"{self.prefix}{key}.")

    def objs(self, key: str) -> list[Record]:
        """A required non-empty list of objects, as Records whose errors name `key[i].field`."""
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected a non-empty list of objects, got {json_type(value)}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{key}[{i}]", f"expected an object, got {json_type(item)}")
            out.append(Record(item, self.source, self.index, self.unit, f"{self.prefix}{key}[{i}]."))
        return out

    def fill(self, key: str, subject: str) -> str:
        """A '{}' template field filled with the subject (ROME / MQuAKE prompts)."""
        template = self.text(key)
        if "{}" not in template:
            raise self.error(key, f"expected a '{{}}' template, got {template!r}")
        return template.replace("{}", subject)

    def rest(self, used: Iterable[str]) -> dict[str, Any]:
        """The fields a reader did not use, kept verbatim for `meta`."""
        used = set(used)
        return {k: v for k, v in self.data.items() if k not in used}


def pairs(rec: Record, prompt_key: str, answer_key: str) -> list[tuple[str, str]]:
    """Zip a prompt field and an answer field (each a string or an equally long list of strings)."""
    prompts, answers = rec.texts(prompt_key), rec.texts(answer_key)
    if len(prompts) != len(answers):
        raise rec.error(answer_key, f"has {len(answers)} answers for {len(prompts)} prompts in '{prompt_key}'")
    return list(zip(prompts, answers))


def usable(probes: Iterable[tuple[str, str]], kind: str, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Keep probes with a non-blank prompt and answer; the others go to meta[f"unusable_{kind}"], not lost."""
    keep, drop = [], []
    for p, a in probes:
        (keep if p.strip() and a.strip() else drop).append((p, a))
    if drop:
        meta.setdefault(f"unusable_{kind}", []).extend([list(x) for x in drop])
    return keep


_FIELD = re.compile(r"EditRequest\.(\w+)")


def build(rec: Record, fields: dict[str, str], **kwargs: Any) -> EditRequest:
    """An EditRequest whose validation errors are re-raised naming the file, record and source field.

    `fields` maps EditRequest fields to the dataset field they came from. A subject that does not occur in
    the prompt is kept as meta["subject"] and the request gets no subject; a blank target skips the record.
    """
    target = kwargs.get("target")
    if isinstance(target, str) and not target.strip():
        raise SkipRecord(fields.get("target", "target"))
    subject, prompt = kwargs.get("subject"), kwargs.get("prompt")
    if isinstance(subject, str) and isinstance(prompt, str) and subject.strip() not in prompt:
        kwargs["meta"] = {**kwargs.get("meta", {}), "subject": subject}
        kwargs["subject"] = None
    try:
        return EditRequest(**kwargs)
    except (TypeError, ValueError) as exc:
        m = _FIELD.search(str(exc))
        raise rec.error(fields.get(m.group(1)) if m else None, str(exc)) from None


def load_json_list(path: str | Path) -> tuple[str, list[Any]]:
    """Parse a JSON file whose top level is a list of records; returns (source name, records)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{source}: expected a JSON list of records at the top level, got {json_type(data)}")
    return source, data


Converter = Callable[[Record], list[EditRequest]]


def convert_all(source: str, records: list[Any], convert: Converter, limit: int | None = None) -> list[EditRequest]:
    """Convert the first `limit` records (all when None) with `convert`, in file order."""
    out: list[EditRequest] = []
    skipped: list[int] = []
    for i, data in enumerate(records[:limit] if limit is not None else records):
        try:
            out.extend(convert(Record(data, source, i)))
        except SkipRecord as exc:
            skipped.append(i)
            field = exc.args[0]
    if skipped:
        shown = ", ".join(map(str, skipped[:20])) + (", ..." if len(skipped) > 20 else "")
        warnings.warn(f"{source}: skipped {len(skipped)} record(s) with a blank '{field}' (no edit to make): "
                      f"records {shown}", DatasetWarning, stacklevel=3)
    return out


def read_with(convert: Converter, path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read a JSON-list dataset file with one format's record converter."""
    limit = check_limit(limit)
    source, records = load_json_list(path)
    return convert_all(source, records, convert, limit)


def check_limit(limit: Any) -> int | None:
    """`limit` is None (all records) or a non-negative int."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    return limit


def _answer(rec: Record, key: str, value: Any) -> str:
    """A probe answer: a string, or the first string of a (nested) list of aliases."""
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str):
        raise rec.error(key, f"expected an answer string or a list of them, got {json_type(value)}")
    return value


def _probes_in(rec: Record, key: str, item: Any) -> list[tuple[str, str]]:
    if isinstance(item, list):
        return [pa for i, x in enumerate(item) for pa in _probes_in(rec, f"{key}[{i}]", x)]
    if not isinstance(item, dict):
        raise rec.error(key, f"expected a probe object or a list of them, got {json_type(item)}")
    if "New Question" in item:
        return [(item["New Question"], _answer(rec, f"{key}.New Answer", item.get("New Answer")))]
    answer_key = next((k for k in ("ground_truth", "answer", "target", "target_new") if k in item), None)
    if "prompt" in item and answer_key:
        prompts, answers = item["prompt"], item[answer_key]
        if not isinstance(prompts, list):
            return [(prompts, _answer(rec, f"{key}.{answer_key}", answers))]
        if isinstance(answers, list) and len(prompts) == len(answers):
            return [(p, _answer(rec, f"{key}.{answer_key}[{i}]", a)) for i, (p, a) in enumerate(zip(prompts, answers))]
        raise rec.error(f"{key}.prompt", f"expected a string, or a list as long as '{answer_key}'")
    # named groups, e.g. {"Reasoning": [...], "Subject_Aliasing": [...]}
    return [pa for name, group in item.items() for pa in _probes_in(rec, f"{key}.{name}", group)]


def portability(rec: Record, key: str = "portability") -> list[tuple[str, str]]:
    """Portability probes in the shapes published files use: {"New Question", "New Answer"} (ZsRE),
    {"prompt", "ground_truth"|"answer"} objects (a string or parallel lists), lists of these, or an object of
    named groups of these. An answer given as a list of aliases uses its first entry."""
    if not rec.has(key):
        return []
    out = _probes_in(rec, key, rec.raw(key))
    for p, _ in out:
        if not isinstance(p, str):
            raise rec.error(key, f"expected prompt strings, got {json_type(p)}")
    return out
