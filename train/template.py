"""The training copy of a base's chat template: the same text plus ``{% generation %}`` markers.

TRL computes the assistant-only loss mask from ``{% generation %}...{% endgeneration %}`` blocks
(transformers' ``return_assistant_tokens_mask``). Most base templates have none, so
`add_generation_markers` derives a copy in which, for assistant messages only, the expression that
prints the message content (and what follows it in the same ``{{ ... }}``: the end-of-turn token)
is wrapped in a generation block. The rendered text does not change: `check_same_rendering`
proves it on sample conversations, and a test keeps proving it.

The original template is what goes beside the adapter (``chat_template.jinja``); the training copy
never leaves the training process.

Where the job ends: this module rewrites and compares template text. Tokenising and masking is
TRL's; choosing when to use the copy is `train.sft`'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hub.errors import Unsupported

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_LOOP_RE = re.compile(r"\{%-?\s*for\s+(\w+)\s+in\s+(?:loop_)?messages\b")
_EXPR_RE = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)

SAMPLE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Name: Ada, age 36"},
        {"role": "assistant", "content": '{"name": "Ada", "age": 36}'},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "two\nlines  "},
        {"role": "assistant", "content": " 2 with {{ braces }} and {% tags %}\n"},
    ],
]


def has_generation_markers(template: str) -> bool:
    """Return True if ``template`` already has ``{% generation %}`` blocks."""
    return _GENERATION_RE.search(template) is not None


def _split_plus(expr: str) -> list[str]:
    """Split a Jinja expression at top-level ``+`` (outside strings and brackets)."""
    parts: list[str] = []
    depth = 0
    quote = ""
    start = 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "+" and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
        i += 1
    parts.append(expr[start:])
    return parts


def _content_names(var: str) -> set[str]:
    return {f"{var}['content']", f'{var}["content"]', f"{var}.content"}


def _prints_content(term: str, names: set[str]) -> bool:
    """True for ``message['content']``, optionally followed by filters (``| trim``)."""
    head = term.split("|", 1)[0].strip()
    return head in names


def _role_test(var: str) -> str:
    return f"{var}['role'] == 'assistant'"


def add_generation_markers(template: str) -> str:
    """Return a copy of ``template`` whose assistant content is wrapped in generation blocks.

    The first ``{{ ... }}`` inside the ``for X in messages`` loop whose top-level ``+`` terms
    include ``X['content']`` is split in two: the terms before the content are printed as before,
    and the content plus the terms after it (the end-of-turn token, so the model learns to stop)
    are printed inside ``{% generation %}`` when the message is the assistant's, and plainly
    otherwise. A template that already has markers is returned unchanged.

    Args:
        template: The base tokenizer's chat template.

    Returns:
        The training template (renders the same text).

    Raises:
        Unsupported: If no such expression is found (the template prints content another way).
    """
    if has_generation_markers(template):
        return template
    loop = _LOOP_RE.search(template)
    if loop is None:
        raise _unsupported("it has no `{% for ... in messages %}` loop")
    var = loop.group(1)
    names = _content_names(var)
    for match in _EXPR_RE.finditer(template, loop.end()):
        left, body, right = match.groups()
        terms = _split_plus(body)
        index = next((i for i, t in enumerate(terms) if _prints_content(t, names)), None)
        if index is None:
            continue
        before = "+".join(terms[:index])
        after = "+".join(terms[index:])
        # Open and close with expressions, never block tags, so that transformers' trim_blocks
        # and lstrip_blocks see the same neighbours as in the original template.
        head = f"{{{{{left}{before}}}}}" if before.strip() else f"{{{{{left}''}}}}"
        rest = "{{" + after + "}}"
        replacement = (
            f"{head}{{% if {_role_test(var)} %}}{{% generation %}}{rest}"
            f"{{% endgeneration %}}{{% else %}}{rest}{{% endif %}}{{{{''{right}}}}}"
        )
        return template[: match.start()] + replacement + template[match.end() :]
    raise _unsupported(f"no `{{{{ ... }}}}` inside the loop prints {var}['content'] with `+`")


def _unsupported(why: str) -> Unsupported:
    return Unsupported(
        f"Cannot derive an assistant-only-loss template from the base chat template: {why}",
        fix="Set `assistant_only_loss: false` in the recipe (loss on every token), or use a base "
        "whose template has `{% generation %}` markers.",
    )


def render(template: str, messages: Sequence[dict[str, str]], **kwargs: object) -> str:
    """Render ``messages`` with ``template`` the way transformers does (its Jinja environment)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(messages)], chat_template=template, **kwargs
    )
    return rendered[0]


def check_same_rendering(
    original: str,
    training: str,
    conversations: Sequence[Sequence[dict[str, str]]] = tuple(SAMPLE_CONVERSATIONS),
) -> None:
    """Raise if ``training`` renders any conversation differently from ``original``.

    Both ``add_generation_prompt`` settings are compared.

    Raises:
        Unsupported: Naming the first conversation that differs.
    """
    for i, messages in enumerate(conversations):
        if refuses(original, messages):  # e.g. Gemma 2 and a system turn: the copy must too
            if not refuses(training, messages):
                raise _unsupported(f"the derived template accepts sample {i}; the base refuses it")
            continue
        for add_prompt in (False, True):
            a = render(original, messages, add_generation_prompt=add_prompt)
            b = render(training, messages, add_generation_prompt=add_prompt)
            if a != b:
                raise _unsupported(
                    f"the derived template renders sample {i} differently ({a[:60]!r} vs "
                    f"{b[:60]!r})"
                )


def refuses(template: str, messages: Sequence[dict[str, str]]) -> bool:
    """True if ``template`` raises on ``messages`` (``raise_exception``, e.g. Gemma 2's system)."""
    from jinja2 import TemplateError

    try:
        render(template, messages, add_generation_prompt=True)
    except TemplateError:
        return True
    return False


def fold_system_turn(template: str, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma's system-role rule: a template that refuses a system turn gets it folded in.

    When ``messages`` start with a system turn that ``template`` refuses (Gemma 2's raises
    "System role not supported"), the system text is put before the first user message with a
    blank line, which is what Gemma 3's own template does with a system turn. Anything else is
    returned unchanged.
    """
    rows = [dict(m) for m in messages]
    if not rows or rows[0].get("role") != "system" or not refuses(template, rows):
        return rows
    system, rest = rows[0]["content"], rows[1:]
    for row in rest:
        if row.get("role") == "user":
            row["content"] = f"{system}\n\n{row['content']}"
            break
    return rest
