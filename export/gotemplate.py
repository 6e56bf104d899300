"""A renderer for the subset of Go's text/template that Ollama chat templates use.

Why: the Ollama TEMPLATE we write must render exactly what the Jinja chat template rendered in
training (lesson 4). Checking that needs a Go template engine; the machine has no Go toolchain,
and a Go build in the test path would cost minutes. Ollama's own templates (its template/*.gotmpl)
use a small part of text/template, so we implement that part, following Go's documented rules:

- text and ``{{ action }}``; trim markers ``{{- `` and `` -}}`` (all adjacent whitespace, only
  when the dash is followed/preceded by a space, as in Go); comments ``{{/* ... */}}``;
- ``if`` / ``else if`` / ``else`` / ``end``, ``range`` (with ``$i, $x :=``, ``else``, ``break``,
  ``continue``) and ``with``;
- variables: ``$`` (the data), ``$x := pipeline``, ``$x = pipeline``, scoped to their block;
- fields ``.A.B``, ``$x.A``, ``(pipeline).A`` on dicts (a missing map key renders as Go's
  ``<no value>``, Ollama parses with ``missingkey=zero``);
- literals: strings (interpreted and raw), integers, floats, ``true``/``false``/``nil``;
- pipes ``a | f b`` and functions ``and or not len index slice eq ne lt le gt ge print json``
  (``json`` is the one function Ollama adds). ``and``/``or`` short-circuit, as since Go 1.18.

Not implemented (an error names them): ``define``/``template``/``block``, ``printf``, ``html``,
``js``, ``urlquery``, ``call``, methods. Data is plain Python (dict, list, str, int, bool, None).

Where the job ends: evaluating a parsed template into a string (parsing is
`export.gotemplate_parse`). What data Ollama passes is `export.templates.ollama_values`.
"""

from __future__ import annotations

import json
from typing import Any

from export.gotemplate_parse import GoTemplateError, Node, Operand, Pipeline, parse

__all__ = ["GoTemplateError", "render", "to_text", "truth"]


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _NoValue:
    """Go's rendering of a missing map key under ``missingkey=zero`` with interface values."""

    def __str__(self) -> str:
        return "<no value>"


NO_VALUE = _NoValue()


def truth(value: Any) -> bool:
    """Go's truth: false, 0, nil, and empty strings, slices and maps are false."""
    if value is None or value is NO_VALUE:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str | list | tuple | dict):
        return len(value) > 0
    return True


def _same_kind(a: Any, b: Any) -> bool:
    kinds = (bool, str, int, float)
    ka = next((k for k in kinds if isinstance(a, k)), type(a))
    kb = next((k for k in kinds if isinstance(b, k)), type(b))
    return ka is kb or {ka, kb} == {int, float}


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise GoTemplateError("eq needs at least two arguments")
    for other in others:
        if first is None or other is None:
            if first is other:
                return True
            continue
        if not _same_kind(first, other):
            raise GoTemplateError(f"incompatible types for comparison: {first!r} and {other!r}")
        if first == other:
            return True
    return False


def _ordered(name: str, a: Any, b: Any) -> bool:
    if not _same_kind(a, b) or isinstance(a, bool) or a is None:
        raise GoTemplateError(f"{name}: incompatible types for comparison: {a!r} and {b!r}")
    return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]


def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))  # Go strings are measured in bytes
    if isinstance(value, list | tuple | dict):
        return len(value)
    raise GoTemplateError(f"len of {type(value).__name__} is not supported")


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key, NO_VALUE)
        elif isinstance(value, list | tuple):
            if not isinstance(key, int) or not 0 <= key < len(value):
                raise GoTemplateError(f"index out of range: {key}")
            value = value[key]
        else:
            raise GoTemplateError(f"cannot index {type(value).__name__}")
    return value


def _slice(value: Any, *bounds: int) -> Any:
    if not isinstance(value, list | tuple | str) or len(bounds) > 2:
        raise GoTemplateError("slice supports lists and strings with at most 2 indices")
    data = value.encode("utf-8") if isinstance(value, str) else value
    start = bounds[0] if bounds else 0
    stop = bounds[1] if len(bounds) > 1 else len(data)
    if not 0 <= start <= stop <= len(data):
        raise GoTemplateError(f"slice index out of range: {start}:{stop}")
    part = data[start:stop]
    return part.decode("utf-8", errors="replace") if isinstance(part, bytes) else list(part)


def _print(*args: Any) -> str:
    out = []
    for i, arg in enumerate(args):
        # Go's fmt.Sprint adds a space between operands when neither is a string.
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(to_text(arg))
    return "".join(out)


FUNCTIONS = {
    "not": lambda v: not truth(v),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: _ordered("lt", a, b),
    "le": lambda a, b: _ordered("le", a, b),
    "gt": lambda a, b: _ordered("gt", a, b),
    "ge": lambda a, b: _ordered("ge", a, b),
    "print": _print,
    "json": lambda v: json.dumps(None if v is NO_VALUE else v, separators=(",", ":"),
                                 ensure_ascii=False),
}


def to_text(value: Any) -> str:
    """Format a value as Go's template printer does for the supported types."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value != int(value) else str(int(value))
    if isinstance(value, list | tuple):
        return "[" + " ".join(to_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{to_text(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


class _Scope:
    def __init__(self, data: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": data}]

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _field(value: Any, chain: list[str]) -> Any:
    for name in chain:
        if isinstance(value, dict):
            value = value.get(name, NO_VALUE)
        elif value is None or value is NO_VALUE:
            raise GoTemplateError(f"nil pointer evaluating .{name}")
        else:
            raise GoTemplateError(f"can't evaluate field {name} in {type(value).__name__}")
    return value


class _Renderer:
    def __init__(self, data: Any) -> None:
        self.scope = _Scope(data)
        self.out: list[str] = []

    def operand(self, op: Operand, dot: Any) -> Any:
        if op.kind == "literal":
            return op.value
        if op.kind == "field":
            return _field(dot, op.chain)
        if op.kind == "var":
            return _field(self.scope.lookup(op.value), op.chain)
        if op.kind == "pipe":
            return _field(self.pipeline(op.value, dot), op.chain)
        if op.value in FUNCTIONS or op.value in ("and", "or"):
            return self.call(op.value, [], dot, None)
        raise GoTemplateError(f"function {op.value!r} is outside the supported subset")

    def call(self, name: str, args: list[Operand], dot: Any, piped: Any) -> Any:
        if name in ("and", "or"):
            values = [lambda a=a: self.operand(a, dot) for a in args]
            if piped is not _UNSET:
                values.append(lambda: piped)
            if not values:
                raise GoTemplateError(f"{name} needs arguments")
            result = None
            for get in values:
                result = get()
                if truth(result) != (name == "and"):
                    return result
            return result
        if name not in FUNCTIONS:
            raise GoTemplateError(f"function {name!r} is outside the supported Go subset")
        evaluated = [self.operand(a, dot) for a in args]
        if piped is not _UNSET:
            evaluated.append(piped)
        return FUNCTIONS[name](*evaluated)

    def pipeline(self, pipe: Pipeline, dot: Any) -> Any:
        value: Any = _UNSET
        for command in pipe.commands:
            head = command[0]
            if head.kind == "ident":
                value = self.call(head.value, command[1:], dot, value)
            elif len(command) > 1 or value is not _UNSET:
                raise GoTemplateError("can't give arguments to a non-function")
            else:
                value = self.operand(head, dot)
        if pipe.decl:
            if pipe.op == ":=":
                self.scope.frames[-1][pipe.decl[-1]] = value
            else:
                self.scope.assign(pipe.decl[-1], value)
        return value

    def render(self, nodes: list[Node], dot: Any) -> None:
        for node in nodes:
            kind = node.kind
            if kind == "text":
                self.out.append(node.text)
            elif kind == "action":
                assert node.pipe is not None
                value = self.pipeline(node.pipe, dot)
                if not node.pipe.decl:
                    self.out.append(to_text(value))
            elif kind in ("if", "with"):
                self._branch(node, dot)
            elif kind == "range":
                self._range(node, dot)
            elif kind == "break":
                raise _Break
            elif kind == "continue":
                raise _Continue

    def _block(self, nodes: list[Node], dot: Any, names: dict[str, Any] | None = None) -> None:
        self.scope.frames.append(dict(names or {}))
        try:
            self.render(nodes, dot)
        finally:
            self.scope.frames.pop()

    def _branch(self, node: Node, dot: Any) -> None:
        assert node.pipe is not None
        self.scope.frames.append({})
        try:
            value = self.pipeline(node.pipe, dot)
            if truth(value):
                self._block(node.body, value if node.kind == "with" else dot)
            else:
                self._block(node.orelse, dot)
        finally:
            self.scope.frames.pop()

    def _range(self, node: Node, dot: Any) -> None:
        assert node.pipe is not None
        pipe = Pipeline(node.pipe.commands)  # evaluate without declaring
        items = self.pipeline(pipe, dot)
        if isinstance(items, dict):
            pairs = [(k, items[k]) for k in sorted(items)]
        elif isinstance(items, list | tuple):
            pairs = list(enumerate(items))
        elif isinstance(items, int) and not isinstance(items, bool):
            pairs = [(i, i) for i in range(items)]
        elif items is None or items is NO_VALUE:
            pairs = []
        else:
            raise GoTemplateError(f"range can't iterate over {to_text(items)}")
        if not pairs:
            self._block(node.orelse, dot)
            return
        decl = node.pipe.decl
        for key, item in pairs:
            names = {}
            if len(decl) == 1:
                names[decl[0]] = item
            elif len(decl) == 2:
                names[decl[0]], names[decl[1]] = key, item
            try:
                self._block(node.body, item, names)
            except _Continue:
                continue
            except _Break:
                break


_UNSET = object()


def render(source: str, data: Any) -> str:
    """Render Go template ``source`` with ``data`` as dot.

    Raises:
        GoTemplateError: Unsupported syntax or a rendering error (as Go would report).
    """
    renderer = _Renderer(data)
    renderer.render(parse(source), data)
    return "".join(renderer.out)
