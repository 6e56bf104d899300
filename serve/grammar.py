"""Output constraints: JSON schemas compiled once per tokenizer into token-level grammars.

The server front (which has the tokenizer) compiles a request's ``response_format`` schema, or a
forced tool call's schema, into a `Constraint` with xgrammar (the library vLLM and SGLang use:
a per-row token bitmask, CPU supported) and passes it in `serve.engine.SamplingParams`. Engines
use it in one of two ways:

- the peft engine's sampler (`serve.runtime.sampling`) asks `Constraint.new_matcher` for a
  `Matcher` per sequence and masks the logits with it at every step;
- the vllm and llama.cpp engines ignore the compiled grammar and translate `Constraint.schema`
  (plain JSON Schema) to their own structured-output / GBNF grammar.

Checks before compiling (each a 400 naming the request path of the schema, e.g.
``response_format.json_schema.schema`` or ``tools[0].function.parameters``): a JSON object, at
most `MAX_SCHEMA_BYTES` serialised and `MAX_SCHEMA_DEPTH` levels deep, valid JSON Schema
(Draft 2020-12 meta-schema, via ``jsonschema``), and compilable by xgrammar (unsupported
keywords, bad ``$ref``, lookaround regexes are refused, never silently dropped).

JSON is generated without free whitespace (``any_whitespace=False``): a small model allowed
arbitrary whitespace can emit newlines until ``max_tokens``.

Where the job ends: compiling and matching. Which schema a request needs is decided by
`serve.http` (response formats) and `serve.tools` (tool calls).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from hub.errors import InvalidInput

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
_CACHE_SIZE = 256
_COMPILER_THREADS = 2
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# ``json_object`` on the peft engine: a JSON object of bounded size, so that a rambling model
# must close it. With "any object" (and with JSON Schema bounds, whose maxProperties xgrammar
# does not enforce under additionalProperties) SmolLM2 nested {"data": {"data": ..., repeated
# keys or wrote digits until max_tokens on 16 of 20 prompts. Here: up to 6 members, keys of
# 1-24 characters; values are scalars (strings up to 48 characters, numbers of up to 13 digits
# and 6 decimals, true/false/null), arrays of up to 4 scalars or objects of up to 4 scalar
# members. Send a json_schema for anything else.
JSON_OBJECT_EBNF = r"""
root ::= "{" (member (", " member){0,5})? "}"
member ::= key ": " value
key ::= "\"" char{1,24} "\""
value ::= scalar | array | object
object ::= "{" (inner (", " inner){0,3})? "}"
inner ::= key ": " scalar
array ::= "[" (scalar (", " scalar){0,3})? "]"
scalar ::= string | number | "true" | "false" | "null"
string ::= "\"" char{0,48} "\""
char ::= [^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
number ::= "-"? ("0" | [1-9] [0-9]{0,12}) ("." [0-9]{1,6})?
"""


@dataclass(eq=False)
class Constraint:
    """A compiled output constraint, shared by every request using the same schema.

    Attributes:
        kind: ``json_schema`` or ``json_object``.
        schema: The JSON Schema the output must match (``{"type": "object"}`` for json_object,
            which the peft engine narrows to `JSON_OBJECT_EBNF`).
        compiled: The xgrammar ``CompiledGrammar``.
        vocab_size: Columns of the model's logits the grammar knows (the mask's width).
        strict: The ``strict`` it was compiled with (to compile it again in another process).
    """

    kind: str
    schema: dict[str, Any]
    compiled: Any
    vocab_size: int
    strict: bool = True

    def new_matcher(self) -> Matcher:
        """A fresh matcher for one sequence."""
        import xgrammar as xgr

        return Matcher(xgr.GrammarMatcher(self.compiled), self.vocab_size)


class Matcher:
    """One sequence's position in its grammar (what `serve.runtime.sampling` needs).

    Args:
        matcher: The xgrammar ``GrammarMatcher``.
        vocab_size: Width of the mask in tokens.
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask_words = (vocab_size + 31) // 32
        self.rejected = 0

    def fill(self, bitmask: Any, index: int) -> None:
        """Write the allowed next tokens into row ``index`` of an int32 bitmask tensor."""
        self._matcher.fill_next_token_bitmask(bitmask, index)

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (and counted) if the grammar does not allow it."""
        ok = bool(self._matcher.accept_token(int(token_id)))
        if not ok:
            self.rejected += 1
        return ok

    def done(self) -> bool:
        """True once the grammar has accepted a stop token."""
        return bool(self._matcher.is_terminated())


class Grammars:
    """Compiles and caches constraints for one tokenizer.

    Args:
        tokenizer: The base's HF tokenizer.
        vocab_size: Columns of the model's logits (``config.json``'s ``vocab_size``; may exceed
            the tokenizer's length when embeddings are padded).
        stop_token_ids: Tokens that end a sequence (allowed once the grammar is complete).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=_COMPILER_THREADS)
        return self._compiler

    def json_object(self) -> Constraint:
        """Any JSON object (``response_format: {"type": "json_object"}``)."""
        return self._compile("json_object", JSON_OBJECT_SCHEMA, param="response_format",
                             strict=False, ebnf=JSON_OBJECT_EBNF)

    def json_schema(self, schema: Any, *, param: str, strict: bool = True) -> Constraint:
        """Output matching ``schema``.

        Args:
            schema: The JSON Schema (a dict).
            param: The request path of the schema, named in errors.
            strict: OpenAI's ``strict``: objects allow no properties beyond the schema's unless
                it says otherwise (xgrammar's ``strict_mode``).

        Raises:
            InvalidInput: The schema is too large, too deep, not valid JSON Schema, or uses
                something the grammar compiler cannot enforce (``param`` names where).
        """
        check_schema(schema, param)
        return self._compile("json_schema", schema, param=param, strict=strict)

    def _compile(self, kind: str, schema: dict[str, Any], *, param: str, strict: bool,
                 ebnf: str | None = None) -> Constraint:
        key = json.dumps([kind, strict, schema], sort_keys=True, separators=(",", ":"))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._get_compiler()
        try:
            if ebnf is not None:
                compiled = compiler.compile_grammar(ebnf)
            else:
                compiled = compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=False, strict_mode=strict)
        except (RuntimeError, ValueError, TypeError) as exc:
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise InvalidInput(
                f"The JSON schema at '{param}' cannot be enforced: {_without_location(detail)}",
                fix="Simplify the schema (supported: types, properties, required, enum, const, "
                    "anyOf/oneOf/allOf, items, local $ref, min/max, patterns without "
                    "lookaround).",
                param=param,
            ) from None
        constraint = Constraint(kind, schema, compiled, self.vocab_size, strict)
        with self._lock:
            self._cache[key] = constraint
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return constraint

    def cached(self) -> int:
        """How many compiled constraints are cached."""
        with self._lock:
            return len(self._cache)


def check_schema(schema: Any, param: str) -> None:
    """Refuse a schema that is not an object, too big, too deep or not valid JSON Schema.

    Raises:
        InvalidInput: Naming ``param`` (the request path of the schema).
    """
    if not isinstance(schema, dict):
        raise InvalidInput(f"'{param}' must be a JSON Schema object, got "
                           f"{type(schema).__name__}",
                           fix='Send a schema such as {"type": "object", "properties": {...}}.',
                           param=param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidInput(f"The JSON schema at '{param}' has {size} bytes; at most "
                           f"{MAX_SCHEMA_BYTES} are accepted", fix="Send a smaller schema.",
                           param=param)
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidInput(f"The JSON schema at '{param}' is nested {depth} levels deep; at "
                           f"most {MAX_SCHEMA_DEPTH} are accepted",
                           fix="Flatten the schema or use $defs.", param=param)
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidInput(f"'{param}' is not a valid JSON Schema at {where}: "
                           f"{exc.message[:200]}",
                           fix="Correct the schema (JSON Schema Draft 2020-12).",
                           param=param) from None


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _without_location(detail: str) -> str:
    """The message of an xgrammar error, without its ``[time] /path/file.cc:LINE:`` prefix."""
    head, sep, tail = detail.partition(".cc:")
    if sep and tail.partition(":")[0].strip().isdigit():
        return tail.partition(":")[2].strip()[:300]
    return detail[:300]
