"""The wire contract: the Python client's dataclasses and the fields the web UI reads agree
with the ``/openapi.json`` of a real ``hindsight serve``.

- Every dataclass of :mod:`hindsight_client.wire` names its component schema in
  ``__schema__``; each field must be a property of it (unless marked as the client's own),
  a field for an optional or nullable property must be ``Optional`` (unless marked
  ``present`` with the reason), and every required property must have a field (unless the
  class lists it in ``__omits__`` or sets ``__partial__``).
- ``web/js/wire.js`` is the only module of the UI that reads the server's JSON; each decoder
  there follows a ``// schema: NAME`` line, and every field it reads of its argument
  (``a.b``, ``a?.b``, ``a['b']``, ``const {b} = a``) must be a property of that schema.

The checkers run on deliberately renamed copies as well, to show that they fail, and on what.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, Server

from hindsight_client import wire
from hindsight_client.transport import LIMIT_REACHED

WIRE_JS = REPO_ROOT / "web" / "js"

Spec = dict[str, Any]


@pytest.fixture(scope="module")
def openapi(hindsight_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spec]:
    """The ``/openapi.json`` of a real server."""
    server = Server(hindsight_bin, tmp_path_factory.mktemp("contract") / "data", ()).start()
    try:
        response = httpx.get(f"{server.url}/openapi.json", timeout=30)
        response.raise_for_status()
        yield response.json()
    finally:
        server.kill()


# -- reading the schemas -------------------------------------------------------------------------


def resolve(spec: Spec, node: Spec) -> Spec:
    """``node`` with its ``$ref`` (if any) followed, to the end of the chain."""
    seen = 0
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/components/schemas/"), ref
        node = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
        seen += 1
        assert seen < 50, f"a $ref cycle at {ref}"
    return node


def nullable(spec: Spec, node: Spec) -> bool:
    """Whether a property's schema admits ``null``: ``type: [X, "null"]`` (OpenAPI 3.1),
    ``oneOf``/``anyOf`` with a ``{type: null}`` branch, or 3.0's ``nullable: true``."""
    node = resolve(spec, node)
    kind = node.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind) or node.get("nullable"):
        return True
    return any(nullable(spec, b) for key in ("oneOf", "anyOf") for b in node.get(key, []))


def object_shape(spec: Spec, node: Spec) -> tuple[dict[str, Spec], set[str]]:
    """The properties and the required ones of an object schema: ``allOf`` merged (all
    parts' properties, all parts' requirements); ``oneOf``/``anyOf`` branches merged too
    (every branch's properties, required only where every object branch requires it;
    ``{type: null}`` branches skipped)."""
    node = resolve(spec, node)
    props: dict[str, Spec] = dict(node.get("properties", {}))
    required: set[str] = set(node.get("required", []))
    for part in node.get("allOf", []):
        p, r = object_shape(spec, part)
        props.update(p)
        required |= r
    for key in ("oneOf", "anyOf"):
        branches = [b for b in node.get(key, []) if resolve(spec, b).get("type") != "null"]
        if not branches:
            continue
        shapes = [object_shape(spec, b) for b in branches]
        for p, _ in shapes:
            props.update(p)
        required |= set.intersection(*(r for _, r in shapes))
    return props, required


def schema_shape(spec: Spec, name: str) -> tuple[dict[str, Spec], set[str]] | None:
    node = spec["components"]["schemas"].get(name)
    return None if node is None else object_shape(spec, node)


# -- the Python dataclasses ----------------------------------------------------------------------


def is_optional(hint: Any) -> bool:
    """Whether a resolved annotation admits ``None`` (``X | None``, ``Optional[X]``)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return type(None) in typing.get_args(hint)
    return hint is type(None) or hint is Any


def check_dataclass(spec: Spec, cls: type) -> list[str]:
    """What is wrong with ``cls`` as a mirror of the schema its ``__schema__`` names; each
    problem names the class, the field and the schema property."""
    name = cls.__schema__  # type: ignore[attr-defined]
    shape = schema_shape(spec, name)
    if shape is None:
        return [f"{cls.__name__}: /openapi.json has no schema {name}"]
    props, required = shape
    hints = typing.get_type_hints(cls)
    problems: list[str] = []
    mirrored: set[str] = set()
    for f in dataclasses.fields(cls):
        prop = f.metadata.get("wire", f.name)
        if prop is None:
            continue
        mirrored.add(prop)
        if prop not in props:
            problems.append(f"{cls.__name__}.{f.name}: {name} has no property {prop!r}")
            continue
        optional = prop not in required or nullable(spec, props[prop])
        if optional and not is_optional(hints[f.name]) and "present" not in f.metadata:
            why = "nullable" if prop in required else "not required"
            problems.append(
                f"{cls.__name__}.{f.name}: {name}.{prop} is {why}, but the field is not Optional"
            )
    omits: dict[str, str] = getattr(cls, "__omits__", {})
    for prop in sorted(omits.keys() - required):
        problems.append(f"{cls.__name__}.__omits__ names {prop!r}, not a required {name} property")
    if not getattr(cls, "__partial__", False):
        for prop in sorted(required - mirrored - omits.keys()):
            problems.append(f"{cls.__name__}: no field for the required {name}.{prop}")
    return problems


def wire_dataclasses() -> list[type]:
    """Every dataclass of ``hindsight_client.wire`` (each must name its schema)."""
    return [
        c
        for c in vars(wire).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == wire.__name__
    ]


# -- the web UI's decoders -----------------------------------------------------------------------

_MARKER = re.compile(r"^[ \t]*// schema: (\w+)[ \t]*$", re.MULTILINE)
_FUNCTION = re.compile(
    r"\s*(?:/\*\*.*?\*/\s*)?(?:export\s+)?(?:async\s+)?function\s*\w*\s*\(([^)]*)\)\s*\{"
    r"|\s*(?:export\s+)?(?:const|let)\s+\w+\s*=\s*(?:async\s*)?\(?([^)=]*?)\)?\s*=>\s*\{",
    re.DOTALL,
)
_IDENT = r"[A-Za-z_$][\w$]*"


def _block(text: str, start: int) -> str:
    """The text of the ``{…}`` block that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    raise ValueError("unbalanced braces")


def _names(pattern: str) -> list[str]:
    """The keys a destructuring pattern ``a, b: c, d = 1, ...rest`` reads."""
    keys = []
    for part in pattern.split(","):
        key = part.split(":")[0].split("=")[0].strip()
        if key and not key.startswith("..."):
            keys.append(key.strip("'\""))
    return keys


def ui_reads(source: str) -> list[tuple[str, str, str]]:
    """``(schema, decoder's argument, field)`` for every field a decoder of ``wire.js`` text
    reads of its argument. A decoder is the function after a ``// schema: NAME`` line."""
    reads: list[tuple[str, str, str]] = []
    for marker in _MARKER.finditer(source):
        schema = marker.group(1)
        fn = _FUNCTION.match(source, marker.end())
        if fn is None:
            raise ValueError(f"no function after `// schema: {schema}`")
        params = (fn.group(1) if fn.group(1) is not None else fn.group(2)).strip()
        body = _block(source, fn.end() - 1)
        if params.startswith("{"):  # function f({ a, b }) destructures its argument
            arg = "(destructured)"
            reads += [(schema, arg, k) for k in _names(params.strip("{} "))]
            continue
        arg = params.split(",")[0].split("=")[0].strip()
        if not re.fullmatch(_IDENT, arg):
            raise ValueError(f"the decoder of {schema} takes no plain argument: {params!r}")
        a = re.escape(arg)
        for m in re.finditer(rf"(?<![\w$.]){a}\s*(?:\?\.|\.)\s*({_IDENT})", body):
            reads.append((schema, arg, m.group(1)))
        for m in re.finditer(rf"(?<![\w$.]){a}\s*(?:\?\.)?\[\s*(['\"])(.*?)\1\s*\]", body):
            reads.append((schema, arg, m.group(2)))
        for m in re.finditer(rf"(?:const|let|var)\s*\{{([^}}]*)\}}\s*=\s*{a}(?![\w$])", body):
            reads += [(schema, arg, k) for k in _names(m.group(1))]
    return reads


def check_ui(spec: Spec, source: str) -> list[str]:
    """The fields the decoders of ``wire.js`` text read that their schema lacks."""
    problems = []
    for schema, arg, key in ui_reads(source):
        shape = schema_shape(spec, schema)
        if shape is None:
            problems.append(f"web/js/wire.js: /openapi.json has no schema {schema}")
        elif key not in shape[0]:
            problems.append(f"web/js/wire.js: {schema} has no property {key!r} ({arg}.{key})")
    return sorted(set(problems))


# -- the contract ------------------------------------------------------------------------------


def test_the_python_dataclasses_mirror_the_schemas(openapi: Spec) -> None:
    classes = wire_dataclasses()
    unnamed = [c.__name__ for c in classes if not hasattr(c, "__schema__")]
    assert unnamed == [], "dataclasses of wire.py that name no schema"
    named = {c.__schema__ for c in classes}  # type: ignore[attr-defined]
    assert {"QualityReport", "Sweep", "SweepPoint", "MetricResult", "MetricInfo"} <= named
    problems = [p for c in classes for p in check_dataclass(openapi, c)]
    assert problems == []


def test_the_fields_the_ui_reads_are_in_the_schemas(openapi: Spec) -> None:
    source = (WIRE_JS / "wire.js").read_text()
    reads = ui_reads(source)
    schemas = {s for s, _, _ in reads}
    assert {"Sweep", "SweepPoint", "MetricResult", "MetricInfo", "QualityReport"} <= schemas
    assert len(reads) > 60, reads
    assert check_ui(openapi, source) == []


def test_no_other_module_of_the_ui_reads_server_fields() -> None:
    # Decoded objects use camelCase; the server's fields are snake_case. A snake_case field
    # read outside wire.js is a server field that bypasses the decoders (request bodies are
    # written as object literals, which this does not match).
    leaks = []
    for path in sorted(WIRE_JS.rglob("*.js")):
        if path.name == "wire.js":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"[\w$\])]\s*(?:\?\.|\.)([a-z][a-z0-9]*_[a-z0-9_]+)\b", line):
                leaks.append(f"{path.relative_to(REPO_ROOT)}:{n}: .{m.group(1)}")
    assert leaks == []


def sweep_events(spec: Spec) -> dict[str, str | None]:
    """The events of ``SweepEvent`` (a ``oneOf`` of ``{event: "NAME", data}``): each name
    with the schema its ``data`` refers to."""
    events: dict[str, str | None] = {}
    for branch in resolve(spec, {"$ref": "#/components/schemas/SweepEvent"}).get("oneOf", []):
        props, _ = object_shape(spec, branch)
        data = props.get("data", {})
        refs = [data, *data.get("allOf", []), *data.get("oneOf", [])]
        ref = next((r["$ref"].rsplit("/", 1)[1] for r in refs if "$ref" in r), None)
        for name in resolve(spec, props["event"]).get("enum", []):
            events[name] = ref
    return events


def test_the_sweep_events_the_clients_read_are_the_servers(openapi: Spec) -> None:
    events = sweep_events(openapi)
    assert {"sweep", "progress", "point", "end", "error", "shutdown"} <= events.keys()
    for name, cls in wire.SWEEP_EVENTS.items():
        assert events[name] == cls.__schema__, name
    listened = re.findall(
        r"events\.addEventListener\('(\w+)'", (WIRE_JS / "pages" / "sweep.js").read_text()
    )
    assert listened
    assert set(listened) <= events.keys()


def test_the_error_codes_the_client_compares_are_the_servers(openapi: Spec) -> None:
    codes = resolve(openapi, {"$ref": "#/components/schemas/ErrorCode"}).get("enum", [])
    assert LIMIT_REACHED in codes


# -- the checkers fail, naming the renamed field ----------------------------------------------


def renamed_copy(cls: type, old: str, new: str) -> type:
    """A copy of dataclass ``cls`` (same schema, metadata and types) with field ``old``
    renamed to ``new``."""
    hints = typing.get_type_hints(cls)
    fields = [
        (new if f.name == old else f.name, hints[f.name], dataclasses.field(metadata=f.metadata))
        for f in dataclasses.fields(cls)
    ]
    assert any(f.name == old for f in dataclasses.fields(cls))
    keep = ("__schema__", "__omits__", "__partial__")
    namespace = {k: getattr(cls, k) for k in keep if hasattr(cls, k)}
    return dataclasses.make_dataclass(cls.__name__, fields, namespace=namespace)


@pytest.mark.parametrize(
    ("cls", "old", "new", "expected"),
    [
        # An optional property: one problem, the field that is not in the schema.
        (
            wire.SweepPoint,
            "grid_url",
            "grid_uri",
            ["SweepPoint.grid_uri: SweepPoint has no property 'grid_uri'"],
        ),
        # A required property: the stray field, and the property left without a field.
        (
            wire.MetricInfo,
            "scale",
            "factor",
            [
                "MetricInfo.factor: MetricInfo has no property 'factor'",
                "MetricInfo: no field for the required MetricInfo.scale",
            ],
        ),
    ],
)
def test_a_renamed_dataclass_field_is_reported(
    openapi: Spec, cls: type, old: str, new: str, expected: list[str]
) -> None:
    assert check_dataclass(openapi, cls) == []
    assert check_dataclass(openapi, renamed_copy(cls, old, new)) == expected


def test_a_non_optional_field_for_an_optional_property_is_reported(openapi: Spec) -> None:
    hints = typing.get_type_hints(wire.BestPoint)
    fields: list[tuple[str, Any, Any]] = [
        (f.name, float if f.name == "error_bar" else hints[f.name], dataclasses.field())
        for f in dataclasses.fields(wire.BestPoint)
    ]
    copy = dataclasses.make_dataclass("BestPoint", fields, namespace={"__schema__": "BestPoint"})
    [problem] = check_dataclass(openapi, copy)
    assert problem.startswith("BestPoint.error_bar: BestPoint.error_bar is ")
    assert problem.endswith(", but the field is not Optional")


def _rename_in_block(source: str, schema: str, old: str, new: str) -> str:
    """``source`` with ``.old`` renamed to ``.new`` in the decoder of ``schema`` only."""
    start = source.index(f"// schema: {schema}\n")
    end = source.find("// schema:", start + 1)
    end = len(source) if end < 0 else end
    block = source[start:end]
    assert f".{old}" in block
    return source[:start] + block.replace(f".{old}", f".{new}") + source[end:]


@pytest.mark.parametrize(
    ("schema", "old", "new"),
    [("SweepPoint", "grid_url", "grid_uri"), ("MetricInfo", "axis_label", "axis_title")],
)
def test_a_renamed_ui_field_is_reported(openapi: Spec, schema: str, old: str, new: str) -> None:
    source = (WIRE_JS / "wire.js").read_text()
    renamed = _rename_in_block(source, schema, old, new)
    arg = next(a for s, a, _ in ui_reads(source) if s == schema)
    assert check_ui(openapi, renamed) == [
        f"web/js/wire.js: {schema} has no property {new!r} ({arg}.{new})"
    ]


def test_the_ui_reader_sees_every_way_of_reading_a_field() -> None:
    source = """
    // schema: Thing
    export function thing(t) {
      const { a, b: bee, c = 1, ...rest } = t;
      return { d: t.d, e: t?.e, f: t['f'], g: t?.["g"], h: other.h, i: t.j.k, no: xt.z };
    }

    // schema: Other
    export const other = ({ x, y }) => { return x + y; };
    """
    assert sorted(ui_reads(source)) == sorted(
        [("Thing", "t", k) for k in "abcdefgj"]
        + [("Other", "(destructured)", "x"), ("Other", "(destructured)", "y")]
    )
