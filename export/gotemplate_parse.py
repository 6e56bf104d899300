"""Parsing for `export.gotemplate`: Go text/template source into a small node tree.

Splits text from ``{{ actions }}`` applying Go's trim markers (``{{- `` / `` -}}``, only with the
space, as in Go) and dropping comments, lexes action bodies (strings with Go escapes, raw
strings, numbers, ``$vars``, ``.Field`` chains, identifiers, ``( ) | , := =``) and builds `Node`
trees for text, actions, ``if``/``else if``/``else``, ``range``, ``with``, ``break`` and
``continue``. ``define``/``template``/``block`` are refused.

Where the job ends: syntax only; what the nodes mean is `export.gotemplate`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hub.errors import InvalidInput

_WS = " \t\r\n"
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<decl>:=)
    | (?P<assign>=)
    | (?P<var>\$[A-Za-z0-9_]*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>[()|,])
    )""",
    re.VERBOSE,
)


class GoTemplateError(InvalidInput):
    """A template uses syntax outside the supported subset, or fails while rendering."""


# -- parse tree ----------------------------------------------------------------------------


@dataclass
class Operand:
    """One argument: a literal, field chain, variable, function name or parenthesised pipe."""

    kind: str  # literal | field | var | ident | pipe
    value: Any = None
    chain: list[str] = field(default_factory=list)


@dataclass
class Pipeline:
    """``[$a, $b :=] cmd | cmd ...``; each command is a list of operands."""

    commands: list[list[Operand]]
    decl: list[str] = field(default_factory=list)
    op: str = ""  # ":=", "=" or ""


@dataclass
class Node:
    """A parse-tree node: text, action, if, range, with, break, continue."""

    kind: str
    text: str = ""
    pipe: Pipeline | None = None
    body: list[Node] = field(default_factory=list)
    orelse: list[Node] = field(default_factory=list)


# -- lexing and parsing --------------------------------------------------------------------


def _split(source: str) -> list[tuple[str, str]]:
    """Split into ``("text", s)`` and ``("action", body)`` applying trim markers."""
    parts: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_WS)
        if start < 0:
            parts.append(("text", text))
            return parts
        end = source.find("}}", start + 2)
        if end < 0:
            raise GoTemplateError(f"Unclosed action at offset {start}")
        body = source[start + 2 : end]
        if body.startswith("-") and body[1:2] in tuple(_WS):
            text = text.rstrip(_WS)
            body = body[1:]
        trim_next = body.endswith("-") and body[-2:-1] in tuple(_WS)
        if trim_next:
            body = body[:-1]
        parts.append(("text", text))
        body = body.strip(_WS)
        if not (body.startswith("/*") and body.endswith("*/")):
            parts.append(("action", body))
        pos = end + 2


def _lex(body: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(body):
        if body[pos:].strip(_WS) == "":
            break
        match = _TOKEN.match(body, pos)
        if match is None or match.end() == pos:
            raise GoTemplateError(f"Cannot parse {body[pos:pos + 20]!r} in {{{{{body}}}}}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "\\": "\\", '"': '"'}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)")


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "xuU":
        return chr(int(code[1:], 16))
    if code[0].isdigit():
        return chr(int(code, 8))
    if code not in _ESCAPES:
        raise GoTemplateError(f"Unknown escape \\{code} in a string literal")
    return _ESCAPES[code]


def _literal(kind: str, text: str) -> Any:
    if kind == "str":
        return _ESCAPE.sub(_unescape, text[1:-1])
    if kind == "raw":
        return text[1:-1]
    return float(text) if "." in text else int(text)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], source: str) -> None:
        self.tokens, self.pos, self.source = tokens, 0, source

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise GoTemplateError(f"Unexpected end of {{{{{self.source}}}}}")
        self.pos += 1
        return token

    def pipeline(self, allow_decl: bool = True) -> Pipeline:
        pipe = Pipeline(commands=[])
        if allow_decl:
            save = self.pos
            names = []
            while (tok := self.peek()) and tok[0] == "var":
                names.append(self.take()[1])
                if (nxt := self.peek()) and nxt == ("punct", ","):
                    self.take()
                    continue
                break
            nxt = self.peek()
            if names and nxt and nxt[0] in ("decl", "assign"):
                pipe.decl, pipe.op = names, self.take()[1]
            else:
                self.pos = save
        command: list[Operand] = []
        while (tok := self.peek()) is not None:
            if tok == ("punct", ")"):
                break
            self.take()
            if tok == ("punct", "|"):
                pipe.commands.append(command)
                command = []
                continue
            command.append(self.operand(tok))
        if not command:
            raise GoTemplateError(f"Empty command in {{{{{self.source}}}}}")
        pipe.commands.append(command)
        return pipe

    def operand(self, tok: tuple[str, str]) -> Operand:
        kind, text = tok
        if kind in ("str", "raw", "num"):
            return Operand("literal", _literal(kind, text))
        if kind == "field":
            return Operand("field", chain=[p for p in text.split(".") if p])
        if kind == "var":
            return self._chained(Operand("var", text))
        if kind == "ident":
            if text in ("true", "false"):
                return Operand("literal", text == "true")
            if text == "nil":
                return Operand("literal", None)
            return Operand("ident", text)
        if tok == ("punct", "("):
            inner = self.pipeline(allow_decl=False)
            if self.take() != ("punct", ")"):
                raise GoTemplateError(f"Missing ')' in {{{{{self.source}}}}}")
            return self._chained(Operand("pipe", inner))
        raise GoTemplateError(f"Unexpected {text!r} in {{{{{self.source}}}}}")

    def _chained(self, operand: Operand) -> Operand:
        tok = self.peek()
        if tok and tok[0] == "field" and tok[1] != ".":
            self.take()
            operand.chain = [p for p in tok[1].split(".") if p]
        return operand


def parse(source: str) -> list[Node]:
    """Parse a template into a node list.

    Raises:
        GoTemplateError: Unsupported or malformed syntax.
    """
    root: list[Node] = []
    stack: list[tuple[Node, list[Node]]] = []
    current = root
    for kind, body in _split(source):
        if kind == "text":
            if body:
                current.append(Node("text", text=body))
            continue
        word = body.split(None, 1)[0] if body else ""
        rest = body[len(word):]
        if word in ("if", "range", "with"):
            node = Node(word, pipe=_Parser(_lex(rest), body).pipeline())
            current.append(node)
            stack.append((node, current))
            current = node.body
        elif word == "else":
            if not stack:
                raise GoTemplateError("{{else}} outside if/range/with")
            node = stack[-1][0]
            follow = rest.split(None, 1)
            if follow and follow[0] in ("if", "with"):
                nested = Node(follow[0], pipe=_Parser(_lex(rest.strip()[len(follow[0]):]),
                                                      body).pipeline())
                node.orelse = [nested]
                stack[-1] = (nested, stack[-1][1])  # one {{end}} closes the whole chain
                current = nested.body
            else:
                current = node.orelse
        elif word == "end":
            if not stack:
                raise GoTemplateError("{{end}} without a block")
            _, current = stack.pop()
        elif word in ("break", "continue"):
            current.append(Node(word))
        elif word in ("define", "template", "block"):
            raise GoTemplateError(f"{{{{{word}}}}} is outside the supported Go template subset")
        else:
            current.append(Node("action", pipe=_Parser(_lex(body), body).pipeline()))
    if stack:
        raise GoTemplateError(f"Missing {{{{end}}}} for {stack[-1][0].kind}")
    return root
