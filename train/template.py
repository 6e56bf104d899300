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


def _marked(match: re.Match[str], names: set[str], var: str) -> str | None:
    """The generation-marked form of one ``{{ ... }}``, or None if it does not print content."""
    left, body, right = match.groups()
    terms = _split_plus(body)
    index = next((i for i, t in enumerate(terms) if _prints_content(t, names)), None)
    if index is None:
        return None
    before = "+".join(terms[:index])
    after = "+".join(terms[index:])
    # Open and close with expressions, never block tags, so that transformers' trim_blocks
    # and lstrip_blocks see the same neighbours as in the original template.
    head = f"{{{{{left}{before}}}}}" if before.strip() else f"{{{{{left}''}}}}"
    rest = "{{" + after + "}}"
    return (
        f"{head}{{% if {_role_test(var)} %}}{{% generation %}}{rest}"
        f"{{% endgeneration %}}{{% else %}}{rest}{{% endif %}}{{{{''{right}}}}}"
    )


def add_generation_markers(template: str) -> str:
    """Return a copy of ``template`` whose assistant content is wrapped in generation blocks.

    Every ``{{ ... }}`` inside the ``for X in messages`` loop whose top-level ``+`` terms
    include ``X['content']`` is split in two: the terms before the content are printed as before,
    and the content plus the terms after it (the end-of-turn token, so the model learns to stop)
    are printed inside ``{% generation %}`` when the message is the assistant's, and plainly
    otherwise. Every one, because templates with a branch per role (Phi-3's) print the
    assistant's content in its own expression, after the system's and the user's. A template
    that already has markers is returned unchanged.

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
    pieces: list[str] = [template[: loop.end()]]
    position = loop.end()
    for match in _EXPR_RE.finditer(template, loop.end()):
        replacement = _marked(match, names, var)
        if replacement is not None:
            pieces += [template[position : match.start()], replacement]
            position = match.end()
    if len(pieces) == 1:
        raise _unsupported(
            f"no `{{{{ ... }}}}` inside the loop prints {var}['content'] with `+`")
    return "".join(pieces) + template[position:]


def _unsupported(why: str) -> Unsupported:
    return Unsupported(
        f"Cannot derive an assistant-only-loss template from the base chat template: {why}",
        fix="Set `assistant_only_loss: false` in the recipe (loss on every token), or use a base "
        "whose template has `{% generation %}` markers.",
    )


# Stand-ins for the special tokens a tokenizer passes to its template (Mistral's and Phi-3's
# concatenate ``eos_token``; undefined, every conversation would look refused).
_SPECIAL_TOKENS = {"bos_token": "<BOS>", "eos_token": "<EOS>"}


def render(template: str, messages: Sequence[dict[str, str]], **kwargs: object) -> str:
    """Render ``messages`` with ``template`` the way transformers does (its Jinja environment).

    ``bos_token``/``eos_token`` default to stand-ins when not given.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(messages)], chat_template=template, **{**_SPECIAL_TOKENS, **kwargs}
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
        if not _marks_every_answer(training, messages):
            raise _unsupported(f"the derived template does not mark the answers of sample {i}")


def _marks_every_answer(training: str, messages: Sequence[dict[str, str]]) -> bool:
    """True if each assistant message's content lies inside a ``{% generation %}`` block."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, spans = render_jinja_template(
        conversations=[list(messages)], chat_template=training,
        return_assistant_tokens_mask=True, **_SPECIAL_TOKENS)
    text, marked = rendered[0], sorted(spans[0])
    answers = [m["content"].strip() for m in messages
               if m.get("role") == "assistant" and m["content"].strip()]
    blocks = iter(text[s:e] for s, e in marked)
    return all(any(answer in block for block in blocks) for answer in answers)


def refuses(template: str, messages: Sequence[dict[str, str]]) -> bool:
    """True if ``template`` raises on ``messages`` (``raise_exception``, e.g. Gemma 2's system)."""
    from jinja2 import TemplateError

    try:
        render(template, messages, add_generation_prompt=True)
    except TemplateError:
        return True
    return False


def fold_system_turn(template: str, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma's system-role rule: a system turn ``template`` refuses is folded into the first user.

    When ``messages`` start with a system turn that ``template`` refuses (Gemma 2's raises
    "System role not supported"), `hub.system_turn.fold_system_turn` puts its text before the
    first user message (the server applies the same rule). Anything else is returned unchanged.
    """
    from hub.system_turn import fold_system_turn as fold
    from hub.system_turn import starts_with_system

    rows = [dict(m) for m in messages]
    if not starts_with_system(rows) or not refuses(template, rows):
        return rows
    return fold(rows)
