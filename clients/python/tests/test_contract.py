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
- Every key the Python decoders read of the server's JSON (each class's ``from_json``,
  ``ErrorDetail.from_body``, :class:`~hindsight_client.sweeps.SweepWatch`, and the properties
  and methods of what they return) must be a property of the schema of the object it reads,
  nested objects included; a required property must not be read with ``.get`` (a default
  would hide a misspelled key); and a payload with only the required properties, nullable
  ones ``null``, must decode. The payloads are made from the schemas, and record each read.

The checkers run on deliberately renamed copies as well, to show that they fail, and on what.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, Server

from hindsight_client import wire
from hindsight_client.sweeps import SweepWatch
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


# -- the keys the Python decoders read -----------------------------------------------------------


class Recorded(dict):  # type: ignore[type-arg]
    """A JSON object of a made-up payload of schema ``schema``: records the keys read of it
    (reading the whole of it reads every key it has)."""

    def __init__(self, schema: str, props: set[str], required: set[str]) -> None:
        super().__init__()
        self.schema, self.props, self.required = schema, props, required
        self.read: set[str] = set()
        self.got: set[str] = set()  # read with .get

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        self.got.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def _whole(self) -> None:
        self.read |= set(dict.keys(self))

    def __iter__(self) -> Iterator[Any]:
        self._whole()
        return super().__iter__()

    def keys(self) -> Any:
        self._whole()
        return super().keys()

    def items(self) -> Any:
        self._whole()
        return super().items()

    def values(self) -> Any:
        self._whole()
        return super().values()

    def copy(self) -> dict[Any, Any]:
        self._whole()
        return dict(super().items())


def payload(
    spec: Spec,
    node: Spec,
    made: list[Recorded],
    *,
    minimal: bool,
    keep: frozenset[str] = frozenset(),
) -> Any:
    """A JSON value of schema ``node``, its objects :class:`Recorded` (and listed in
    ``made``): every property present, or (``minimal``) only the required ones and those
    in ``keep`` (at the top), nullable ones ``null``; arrays of one element."""
    name = "(inline)"
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        node = spec["components"]["schemas"][name]
    if "properties" in node or "allOf" in node:
        props, required = object_shape(spec, node)
        obj = Recorded(name, set(props), required)
        made.append(obj)
        for key, sub in props.items():
            if key in keep:
                dict.__setitem__(obj, key, payload(spec, sub, made, minimal=False))
            elif key in required or not minimal:
                dict.__setitem__(obj, key, payload(spec, sub, made, minimal=minimal))
        return obj
    for key in ("oneOf", "anyOf"):
        if key in node:
            branches = [b for b in node[key] if resolve(spec, b).get("type") != "null"]
            if minimal and len(branches) < len(node[key]):
                return None
            return payload(spec, branches[0], made, minimal=minimal)
    kind = node.get("type")
    if isinstance(kind, list):
        if minimal and "null" in kind:
            return None
        kind = next(k for k in kind if k != "null")
    if "enum" in node:
        return node["enum"][0]
    if kind == "array":
        return [payload(spec, node.get("items", {}), made, minimal=minimal)]
    return {"string": "x", "integer": 1, "number": 0.5, "boolean": True, "object": {}}.get(
        str(kind)
    )


def exercise(value: Any) -> None:
    """Reads what the client offers of a decoded value: its fields, properties and
    metric methods, and theirs."""
    if isinstance(value, Recorded):
        return  # a payload handed on as the server sent it: reading it is the caller's
    if isinstance(value, list | tuple):
        for v in value:
            exercise(v)
    elif isinstance(value, dict):
        for v in value.values():
            exercise(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.name not in ("raw", "_client"):
                exercise(getattr(value, f.name))
        for name, member in inspect.getmembers(type(value)):
            if isinstance(member, property):
                exercise(getattr(value, name))
        for method in ("value", "metric", "best", "metric_info"):
            if callable(getattr(value, method, None)):
                for metric in ("fid", "kid"):
                    exercise(getattr(value, method)(metric))


def _watched(name: str) -> Callable[[Any], None]:
    def decode(data: Any) -> None:
        watch = SweepWatch(lambda _name, _data: None)
        if name == "sweep":
            watch.event("sweep", data)
            watch.state(data)  # a second state: compared point by point
        else:
            watch._points = {}  # a watch that has seen the sweep
            watch.event(name, data)
        exercise(watch.final)

    return decode


class Decoder(typing.NamedTuple):
    """A decoder of the server's JSON: its ``name``, the ``schema`` of what it reads, the
    call (``decode(payload)``), and the optional properties it may count on (``keep``)."""

    name: str
    schema: str
    decode: Callable[[Any], None]
    keep: frozenset[str] = frozenset()


def _from_json(cls: Any) -> Callable[[Any], None]:
    return lambda data: exercise(cls.from_json(data))


def decoders() -> list[Decoder]:
    """Every decoder of the server's JSON: each ``from_json`` of :mod:`hindsight_client.wire`,
    ``ErrorDetail.from_body``, and :class:`~hindsight_client.sweeps.SweepWatch`'s events."""
    found: list[Decoder] = []
    for cls in wire_dataclasses():
        if cls is wire.Reconstruction:
            # made once the server says `ready`: then the properties marked `present` are there
            keep = frozenset(
                f.metadata.get("wire", f.name)
                for f in dataclasses.fields(cls)
                if "present" in f.metadata
            )
            found.append(
                Decoder(
                    "Reconstruction.from_json",
                    "ReconstructionView",
                    lambda data: exercise(wire.Reconstruction.from_json(data, None, waited=False)),  # type: ignore[arg-type]
                    keep,
                )
            )
        elif cls is wire.ErrorDetail:
            found.append(
                Decoder(
                    "ErrorDetail.from_body",
                    "ErrorBody",
                    lambda data: exercise(wire.ErrorDetail.from_body(data)),
                )
            )
        elif hasattr(cls, "from_json"):
            found.append(Decoder(f"{cls.__name__}.from_json", cls.__schema__, _from_json(cls)))  # type: ignore[attr-defined]
    for event, cls in wire.SWEEP_EVENTS.items():
        found.append(Decoder(f"SweepWatch.event({event!r})", cls.__schema__, _watched(event)))
    return found


def check_decoder(spec: Spec, decoder: Decoder) -> list[str]:
    """What a decoder reads of a made-up payload that the schemas do not have, or reads
    with ``.get`` although required; and whether it decodes a minimal payload (the required
    properties, and those it may count on)."""
    name, schema, decode, keep = decoder
    problems: list[str] = []
    for minimal in (False, True):
        made: list[Recorded] = []
        ref = {"$ref": f"#/components/schemas/{schema}"}
        data = payload(spec, ref, made, minimal=minimal, keep=keep)
        try:
            decode(data)
            failure = None
        except Exception as e:
            failure = e
        found = [
            f"{name} reads {key!r}, not a property of {obj.schema}"
            for obj in made
            for key in sorted(obj.read - obj.props, key=str)
        ] + [
            f"{name} reads the required {obj.schema}.{key} with .get"
            for obj in made
            for key in sorted(obj.got & obj.required)
        ]
        if failure is not None and not found:
            kind = "a minimal" if minimal else "an"
            found.append(f"{name} fails on {kind} {schema} payload: {failure!r}")
        problems += [p for p in dict.fromkeys(found) if p not in problems]
    return problems


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
    assert {
        "QualityReport",
        "Sweep",
        "SweepPoint",
        "MetricResult",
        "MetricInfo",
        "Lease",
        "SweepWorker",
        "SweepFailure",
        "UserMetric",
        "SnapshotRow",
        "RunSummary",
        "DeletedSnapshot",
        "AuthStatus",
    } <= named
    problems = [p for c in classes for p in check_dataclass(openapi, c)]
    assert problems == []


def test_the_python_decoders_read_only_the_schemas_properties(openapi: Spec) -> None:
    found = decoders()
    names = {d.name for d in found}
    assert {
        "Sweep.from_json",
        "SweepPoint.from_json",
        "PointResult.from_json",
        "Reconstruction.from_json",
        "ErrorDetail.from_body",
        "SweepWatch.event('progress')",
        "Lease.from_json",
        "StoredSnapshot.from_json",
        "RunSummary.from_json",
        "DeletedSnapshot.from_json",
        "AuthStatus.from_json",
    } <= names
    problems = [p for decoder in found for p in check_decoder(openapi, decoder)]
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


def misread_copy(cls: type, method: str, old: str, new: str) -> Any:
    """``cls.method`` compiled again with ``old`` replaced by ``new`` in its source."""
    source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    assert source.count(old) == 1, source
    namespace = dict(vars(wire))
    exec(compile(source.replace(old, new), wire.__file__, "exec"), namespace)
    return namespace[method]


@pytest.mark.parametrize(
    ("cls", "old", "new", "decoder", "expected"),
    [
        # A misspelled optional property read with .get, two objects deep.
        (
            wire.MetricSummary,
            'm.get("error_bar")',
            'm.get("error_bars")',
            "SweepPoint",
            "SweepPoint.from_json reads 'error_bars', not a property of MetricResult",
        ),
        # A misspelled required property: the decoder fails, naming the key.
        (
            wire.Sweep,
            's["best"]',
            's["bests"]',
            "Sweep",
            "Sweep.from_json reads 'bests', not a property of Sweep",
        ),
        # A required property read with a default.
        (
            wire.Timings,
            't["sample_s"]',
            't.get("sample_s", 0.0)',
            "SweepPoint",
            "SweepPoint.from_json reads the required Timings.sample_s with .get",
        ),
    ],
)
def test_a_misread_key_is_reported(
    openapi: Spec,
    monkeypatch: pytest.MonkeyPatch,
    cls: type,
    old: str,
    new: str,
    decoder: str,
    expected: str,
) -> None:
    checked = next(d for d in decoders() if d.name == f"{decoder}.from_json")
    assert check_decoder(openapi, checked) == []
    monkeypatch.setattr(cls, "from_json", misread_copy(cls, "from_json", old, new))
    assert check_decoder(openapi, checked) == [expected]


def test_the_payloads_record_every_way_of_reading_a_key() -> None:
    obj = Recorded("Thing", {"a", "b"}, {"a"})
    dict.update(obj, {"a": 1, "b": 2})
    _ = obj["a"], obj.get("c"), "d" in obj
    assert (obj.read, obj.got) == ({"a", "c", "d"}, {"c"})
    assert dict(obj) == {"a": 1, "b": 2}
    assert obj.read == {"a", "b", "c", "d"}


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
