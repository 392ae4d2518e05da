"""Generates reference/config.md from the pydantic models of the config schema (run by mkdocs-gen-files at build
time; nothing on that page is written by hand).

Walks :class:`curvdist.cli.config.Config` (the YAML config of ``curvdist run`` / ``curvdist train``) and
:class:`curvdist.integrations.deepspeed.config.CurvdistSection` (the ``curvdist`` section of a DeepSpeed config)
through every nested model and every member of the discriminated query union, and writes one table per model:
key, type, default and the description found in the source (the field's ``description``, a ``#:`` comment above
it or a ``#`` comment after it). ``tests/test_docs.py`` checks that every field of every model appears.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import tokenize
import types
import typing
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from curvdist.cli.config import Config
from curvdist.integrations.deepspeed.config import CurvdistSection

ROOTS = (("curvdist run / curvdist train (YAML)", Config, ""),
         ("DeepSpeed: the curvdist section of the DeepSpeed JSON config", CurvdistSection, "curvdist"))
PAGE = "reference/config.md"


def anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _query_kind(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    if field is not None and typing.get_origin(field.annotation) is Literal and len(typing.get_args(field.annotation)) == 1:
        return typing.get_args(field.annotation)[0]
    return None


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through Optional, unions, lists, dicts and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += nested_models(arg)
    return out


def walk(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every model reachable from its fields, in order of first appearance."""
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        model = todo.pop(0)
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo += [m for m in nested_models(field.annotation) if m not in seen]
    return seen


def key_paths(root: type[BaseModel], prefix: str) -> dict[type[BaseModel], list[str]]:
    """Where each model sits in a config: dotted key paths from ``root`` (``[]`` marks a list item)."""
    out: dict[type[BaseModel], list[str]] = {root: [prefix or "(top level)"]}
    todo = [(root, prefix)]
    while todo:
        model, path = todo.pop(0)
        for name, field in model.model_fields.items():
            item = typing.get_origin(field.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(field.annotation))
            here = f"{path}.{name}" if path else name
            here += "[]" if item or name == "queries" else ""
            for m in nested_models(field.annotation):
                if here not in out.setdefault(m, []):
                    out[m].append(here)
                    todo.append((m, here))
    return out


def all_models() -> list[type[BaseModel]]:
    out: list[type[BaseModel]] = []
    for _, root, _ in ROOTS:
        out += [m for m in walk(root) if m not in out]
    return out


def source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Comments next to each field in the class body: ``#:`` lines above it and a ``#`` comment after it."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        lines = source.splitlines()
        comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        for i, line in enumerate(lines, start=1):
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
                continue
            m = re.match(r"\s+(\w+)\s*:", line)
            if m and not stripped.startswith(("def ", "@", "#", "\"", "_")):
                text = list(pending)
                if i in comments and not stripped.startswith("#"):
                    text.append(comments[i].lstrip("#").strip())
                if text:
                    out[m.group(1)] = " ".join(text)
            pending = [] if not stripped.startswith("#:") else pending
    return out


def _bounds(metadata: list[Any]) -> str:
    """Constraints such as Field(gt=0) or PositiveInt as text ("> 0")."""
    parts: list[str] = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            parts.append(_bounds(list(m.metadata)))
            continue
        for attr, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "length ≥")):
            value = getattr(m, attr, None)
            if isinstance(m, annotated_types.BaseMetadata) and value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(dict.fromkeys(p for p in parts if p))


def type_name(annotation: Any, models: list[type[BaseModel]]) -> str:
    """A readable type: literals as their choices, models as links to their tables."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        kind = _query_kind(annotation)
        name = f"query `{kind}`" if kind else annotation.__name__
        return f"[{name}](#{anchor(annotation)})" if annotation in models else name
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if isinstance(a, str) else f"`{json.dumps(a)}`" for a in args)
    if origin is typing.Annotated:
        inner, *meta = args
        bounds = _bounds(meta)
        members = [m for m in nested_models(inner)]
        if members and len(members) > 1:  # the discriminated query union
            return "query (one of the `kind`s below)"
        base = type_name(inner, models)
        return f"{base} ({bounds})" if bounds else base
    if origin in (Union, types.UnionType):
        members = nested_models(annotation)
        if len(members) > 1 and all(_query_kind(m) for m in members):
            return "query (one of the `kind`s below)"
        return " \\| ".join(type_name(a, models) for a in args)
    if origin in (list, tuple, typing.Sequence):
        return f"list of {type_name(args[0], models)}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def field_type(field: FieldInfo, models: list[type[BaseModel]]) -> str:
    base = type_name(field.annotation, models)
    bounds = _bounds(field.metadata)
    return f"{base} ({bounds})" if bounds else base


def default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        dumped = value.model_dump(exclude_defaults=True)
        return "its defaults" if not dumped else f"`{json.dumps(dumped)}`"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def describe(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    inherited = {inspect.getdoc(b) for b in model.__mro__[1:]}
    return "" if doc in inherited else " ".join(doc.split())


def rst_to_md(text: str) -> str:
    return re.sub(r":(?:class|func|mod|meth):`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def table(model: type[BaseModel], models: list[type[BaseModel]]) -> str:
    comments = source_comments(model)
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        text = field.description or comments.get(name, "")
        text = rst_to_md(text).replace("|", "\\|")
        rows.append(f"| `{field.alias or name}` | {field_type(field, models)} | {default_of(field)} | {text} |")
    return "\n".join(rows)


def render() -> str:
    models = all_models()
    out = ["# Config schema", "",
           "Generated at build time from the pydantic models of `curvdist/cli/config.py`, "
           "`curvdist/queries/specs.py` and `curvdist/integrations/deepspeed/config.py`: every key, its type and "
           "its default. Unknown keys are errors (one line naming the key). Wherever a `curvature` or `metric` "
           "mapping is expected, a bare name stands for `{kind: name}`. See [the CLI guide](../guides/cli.md) "
           "for an annotated config and [the DeepSpeed guide](../guides/deepspeed.md) for the DeepSpeed section.",
           ""]
    done: set[type[BaseModel]] = set()
    where: dict[type[BaseModel], list[str]] = {}
    for _, root, prefix in ROOTS:
        for model, paths in key_paths(root, prefix).items():
            where.setdefault(model, []).extend(paths)
    for title, root, prefix in ROOTS:
        out += [f"## {title}", ""]
        for model in walk(root):
            if model in done:
                continue
            done.add(model)
            kind = _query_kind(model)
            heading = f"query `kind: {kind}`" if kind else f"`{model.__name__}`"
            out += [f"### {heading} {{#{anchor(model)}}}", ""]
            paths = where.get(model, [])
            if paths:
                out += ["At: " + ", ".join(f"`{p}`" for p in paths[:6]) + (", …" if len(paths) > 6 else ""), ""]
            doc = describe(model)
            if doc:
                out += [rst_to_md(doc), ""]
            out += [table(model, models), ""]
    return "\n".join(out) + "\n"


def main() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write(render())


if __name__ in ("__main__", "<run_path>"):
    main()
