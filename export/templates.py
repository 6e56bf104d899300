"""Translate a Jinja chat template into an Ollama Go template, and prove the two render alike.

Jinja cannot be translated in general, so we recognise the template's family by its markers and
write that family's Go template, filling in what varies between models by rendering probe
conversations through the Jinja original (a built-in default system prompt, where a system message
goes, the separators around it). Families: ChatML (SmolLM2, Qwen), Llama-3, Mistral ``[INST]``,
Gemma ``<start_of_turn>``, Phi-3 ``<|assistant|>``. Anything else is refused by name.

Every translation is then verified: each probe conversation (with/without system, one and several
turns, ending with the user or the assistant) is rendered by Jinja exactly as transformers does in
training and by our Go renderer (`export.gotemplate`) with the values Ollama passes
(`ollama_values`); the strings must be equal. The pairing of options: Ollama always renders the
generation prompt after a user turn and closes a trailing assistant turn, which is Jinja's
``add_generation_prompt = (last role != "assistant")``. A BOS token that llama.cpp adds by itself
(``add_bos_token``) is left out of the Go template and accounted for in the comparison.

Where the job ends: strings in, a verified `Translation` out. Writing the Modelfile is
`export.ollama`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from export.gotemplate import render as render_go
from hub.errors import Unsupported

Messages = list[dict[str, str]]
Render = Callable[[Messages, bool], str]

_S = "You are a terse assistant.\nAnswer briefly."
_U1 = "Hello there!\nHow are you?"
_A1 = "I'm fine, thanks. And you?"
_U2 = "Tell me a joke about cats 🐱 (short)."
_A2 = "Why did the cat sit on the computer? To keep an eye on the mouse."
PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", _U1),),
    (("system", _S), ("user", _U1)),
    (("user", _U1), ("assistant", _A1)),
    (("system", _S), ("user", _U1), ("assistant", _A1)),
    (("user", _U1), ("assistant", _A1), ("user", _U2)),
    (("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)),
    (("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2)),
    (("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2)),
)
_LAST = '(eq (len (slice $.Messages $i)) 1)'
THINK = "<think>\n\n</think>\n\n"  # Qwen3's empty thinking block


@dataclass
class Translation:
    """A verified Go template for Ollama.

    Attributes:
        family: Recognised family (``chatml``, ``llama3``, ``mistral``, ``gemma``).
        go_template: The Ollama TEMPLATE.
        stops: End markers for ``PARAMETER stop``.
        bos_prefix: BOS text the runtime adds before the rendered template (llama.cpp's
            ``add_bos_token``), which the Jinja template renders itself.
        supports_system: Whether the Jinja template accepts a system message.
        default_system: The system prompt the template inserts when none is given.
        checked: Probe conversations rendered identically.
        notes: Caveats worth showing the user.
    """

    family: str
    go_template: str
    stops: list[str]
    bos_prefix: str = ""
    supports_system: bool = True
    default_system: str | None = None
    checked: int = 0
    notes: list[str] = field(default_factory=list)


def render_chat(template: str, messages: Messages, *, add_generation_prompt: bool,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render a Jinja chat template exactly as transformers' ``apply_chat_template`` does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template,
        add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
    )
    return rendered[0]


def ollama_values(messages: Messages) -> dict[str, Any]:
    """The data Ollama passes to a messages template (its template.Execute / collate).

    Consecutive messages of the same role are merged with a blank line; ``System`` joins every
    system message; messages keep their position.
    """
    collated: list[dict[str, str]] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"] and message["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated, "Tools": None, "Response": ""}


def go_literal(text: str) -> str:
    """Text for a Go template: raw when safe, else a quoted string action."""
    if "{{" not in text and "}}" not in text:
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '{{ "' + escaped + '" }}'


def _messages(probe: tuple[tuple[str, str], ...]) -> Messages:
    return [{"role": role, "content": content} for role, content in probe]


def _between(text: str, left: str, right: str) -> str | None:
    """The text between the first ``left`` and the next ``right`` (None if absent)."""
    start = text.find(left)
    if start < 0:
        return None
    start += len(left)
    end = text.find(right, start)
    return None if end < 0 else text[start:end]


def _try(render: Render, messages: Messages, gen: bool) -> str | None:
    try:
        return render(messages, gen)
    except Exception:  # noqa: BLE001 - the template refused the conversation (raise_exception)
        return None


def _system_placement(render: Render, user_prefix: str) -> tuple[bool, str, str]:
    """For families that fold the system prompt into a user turn: (supported, join, which)."""
    one = _try(render, _messages((("system", _S), ("user", _U1))), True)
    if one is None:
        return False, "", "first"
    join = _between(one, user_prefix + _S, _U1)
    if join is None:
        raise Unsupported("The template places the system message where loradock cannot follow",
                          fix="Use a ChatML, Llama-3, Mistral or Gemma style template.")
    two = _try(render, _messages(PROBES[5]), True) or ""
    which = "last" if (_S + join + _U2) in two else "first"
    return True, join, which


def _system_slot(which: str, join: str) -> tuple[str, str]:
    """Go code (prelude, in-turn part) that puts ``$.System`` + ``join`` before a user turn.

    ``first``: the first user message. ``last``: the final message, when it is the user's
    (Mistral v0.3 style; a conversation ending with the assistant shows no system prompt).
    """
    if which == "last":
        cond, prelude = _LAST, ""
    else:
        cond = "(eq $i $target)"
        prelude = (
            "{{- $target := -1 }}{{- range $i, $m := .Messages }}"
            '{{- if and (eq $m.Role "user") (lt $target 0) }}{{ $target = $i }}{{- end }}'
            "{{- end }}"
        )
    part = f"{{{{ if and $.System {cond} }}}}{{{{ $.System }}}}{go_literal(join)}{{{{ end }}}}"
    return prelude, part


def _chatml(render: Render, strip: Callable[[str], str]) -> Translation:
    text = strip(render(_messages(PROBES[0]), False))
    head = text[: text.find("<|im_start|>user\n")]
    default = _between(head, "<|im_start|>system\n", "<|im_end|>\n") if head else None
    if head and head != f"<|im_start|>system\n{default}<|im_end|>\n":
        raise Unsupported(f"ChatML template inserts unrecognised text {head[:60]!r}",
                          fix="Use a plain ChatML template.")
    go = "{{- range $i, $m := .Messages }}"
    if default is not None:
        go += ('{{ if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
               f"{go_literal(default)}<|im_end|>\n{{{{ end }}}}")
    # Qwen3 prints an empty thinking block before the last answer's content.
    pair = strip(render(_messages(PROBES[2]), False))
    think = THINK if f"<|im_start|>assistant\n{THINK}{_A1}" in pair else ""
    go += "<|im_start|>{{ $m.Role }}\n"
    if think:
        go += f'{{{{ if and {_LAST} (eq $m.Role "assistant") }}}}{go_literal(think)}{{{{ end }}}}'
    go += ("{{ $m.Content }}<|im_end|>\n"
           f'{{{{ if and {_LAST} (ne $m.Role "assistant") }}}}<|im_start|>assistant\n{{{{ end }}}}'
           "\n{{- end }}")
    result = Translation("chatml", go, ["<|im_start|>", "<|im_end|>"], default_system=default)
    if think:
        result.notes.append("Qwen3's empty thinking block is written before the last answer.")
    return result


def _llama3(render: Render, strip: Callable[[str], str]) -> Translation:
    text = strip(render(_messages(PROBES[0]), False))
    if not text.startswith("<|start_header_id|>user<|end_header_id|>"):
        raise Unsupported(
            "Llama-3 template inserts a built-in system header (e.g. Llama 3.1's dates)",
            fix="Use a plain Llama-3 template.",
        )
    go = ("{{- range $i, $m := .Messages }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n"
          "{{ $m.Content }}<|eot_id|>\n"
          f'{{{{- if and {_LAST} (ne $m.Role "assistant") }}}}'
          "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n{{- end }}")
    return Translation("llama3", go, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


def _mistral(render: Render, strip: Callable[[str], str]) -> Translation:
    user = strip(render(_messages(PROBES[0]), False))
    pair = strip(render(_messages(PROBES[2]), False))
    u_pre, _, u_suf = user.partition(_U1)
    a_pre, _, a_suf = pair[len(user):].partition(_A1)
    if not pair.startswith(user) or not u_pre:
        raise Unsupported("Mistral template renders turns in an unrecognised way",
                          fix="Use a Mistral [INST] template.")
    system, join, which = _system_placement(render, u_pre)
    prelude, sys_part = _system_slot(which, join) if system else ("", "")
    go = (prelude + "{{- range $i, $m := .Messages }}"
          f'{{{{- if eq $m.Role "user" }}}}{go_literal(u_pre)}{sys_part}{{{{ $m.Content }}}}'
          f"{go_literal(u_suf)}"
          f'{{{{ else if eq $m.Role "assistant" }}}}{go_literal(a_pre)}{{{{ $m.Content }}}}'
          f"{go_literal(a_suf)}{{{{ end }}}}{{{{ end }}}}")
    stops = ["[INST]", "[/INST]"] + ([a_suf.strip()] if a_suf.strip() else [])
    return Translation("mistral", go, stops, supports_system=system)


def _gemma(render: Render, strip: Callable[[str], str]) -> Translation:
    system, join, which = _system_placement(render, "<start_of_turn>user\n")
    prelude, sys_part = _system_slot(which, join) if system else ("", "")
    go = (prelude + "{{- range $i, $m := .Messages }}"
          f'{{{{- if eq $m.Role "user" }}}}<start_of_turn>user\n{sys_part}'
          "{{ $m.Content }}<end_of_turn>\n"
          '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n'
          "{{ $m.Content }}<end_of_turn>\n"
          f'{{{{ end }}}}{{{{- if and {_LAST} (ne $m.Role "assistant") }}}}<start_of_turn>model\n'
          "{{ end }}{{- end }}")
    return Translation("gemma", go, ["<start_of_turn>", "<end_of_turn>"], supports_system=system)


def _phi3(render: Render, strip: Callable[[str], str]) -> Translation:
    r"""Phi-3: ``<|role|>\ncontent<|end|>\n`` turns; some versions drop system messages."""
    user = strip(render(_messages(PROBES[0]), True))
    if user != f"<|user|>\n{_U1}<|end|>\n<|assistant|>\n":
        raise Unsupported(f"Phi-3 template renders a user turn as {user[:60]!r}",
                          fix="Use a plain Phi-3 template.")
    pair = strip(render(_messages(PROBES[2]), False))
    tail = pair.removeprefix(f"{user}{_A1}<|end|>\n")
    if tail == pair:
        raise Unsupported("Phi-3 template renders an assistant turn in an unrecognised way",
                          fix="Use a plain Phi-3 template.")
    with_system = _try(render, _messages(PROBES[1]), True)
    system = with_system is not None and strip(with_system) == f"<|system|>\n{_S}<|end|>\n{user}"
    roles = '(or (eq $m.Role "user") (eq $m.Role "assistant")' + (
        ' (eq $m.Role "system"))' if system else ")")
    go = ("{{- range $i, $m := .Messages }}"
          f"{{{{- if {roles} }}}}<|{{{{ $m.Role }}}}|>\n{{{{ $m.Content }}}}<|end|>\n{{{{ end }}}}"
          f'{{{{- if and {_LAST} (ne $m.Role "assistant") }}}}<|assistant|>\n'
          f"{{{{ else if {_LAST} }}}}{go_literal(tail)}{{{{ end }}}}"
          "{{- end }}")
    result = Translation("phi3", go, ["<|end|>", "<|user|>", "<|assistant|>"] + (
        [tail] if tail.strip() else []), supports_system=system)
    if not system:
        result.notes.append("The Phi-3 template drops system messages; so does the Modelfile.")
    return result


# Family name -> (marker in the Jinja source, builder). Checked in order.
FAMILIES: dict[str, tuple[str, Callable[[Render, Callable[[str], str]], Translation]]] = {
    "llama3": ("<|start_header_id|>", _llama3),
    "gemma": ("<start_of_turn>", _gemma),
    "mistral": ("[INST]", _mistral),
    "chatml": ("<|im_start|>", _chatml),
    "phi3": ("<|assistant|>", _phi3),
}


def detect_family(template: str) -> str:
    """Return the family name of a Jinja chat template.

    Raises:
        Unsupported: No known family's marker is in the template.
    """
    for name, (marker, _) in FAMILIES.items():
        if marker in template:
            return name
    raise Unsupported(
        "The chat template is not one loradock can translate for Ollama",
        fix="Supported families: ChatML (<|im_start|>), Llama-3 (<|start_header_id|>), "
        "Mistral ([INST]), Gemma (<start_of_turn>) and Phi-3 (<|assistant|>). Build the "
        "Modelfile TEMPLATE by hand.",
        param="chat_template",
    )


def translate(template: str, *, bos_token: str = "", eos_token: str = "",
              add_bos: bool = False) -> Translation:
    """Translate a Jinja chat template into a verified Ollama Go template.

    Args:
        template: The Jinja chat template (as used in training).
        bos_token: Text of the BOS token (passed to Jinja as ``bos_token``).
        eos_token: Text of the EOS token.
        add_bos: Whether llama.cpp adds BOS itself (GGUF ``tokenizer.ggml.add_bos_token``).

    Raises:
        Unsupported: Unknown family, or the translation renders differently from Jinja.
    """
    family = detect_family(template)

    def render(messages: Messages, gen: bool) -> str:
        return render_chat(template, messages, add_generation_prompt=gen,
                           bos_token=bos_token, eos_token=eos_token)

    first = render(_messages(PROBES[0]), True)
    # Only a template that prints ``bos_token`` renders BOS (SmolLM2's BOS text is <|im_start|>).
    renders_bos = bool(bos_token) and "bos_token" in template and first.startswith(bos_token)

    def strip(text: str) -> str:
        return text[len(bos_token):] if renders_bos and text.startswith(bos_token) else text

    result = FAMILIES[family][1](render, strip)
    if renders_bos and add_bos:
        result.bos_prefix = bos_token
    elif renders_bos:
        result.go_template = go_literal(bos_token) + result.go_template
    if "trim" in template or ".strip()" in template:
        result.notes.append("The Jinja template trims message content; Ollama sends it as typed.")
    verify(template, result, render)
    return result


def verify(template: str, result: Translation, render: Render) -> Translation:
    """Render every probe with Jinja and with the Go template; raise on the first difference."""
    checked = 0
    for probe in PROBES:
        messages = _messages(probe)
        if not result.supports_system and messages[0]["role"] == "system":
            continue
        gen = messages[-1]["role"] != "assistant"
        expected = _try(render, messages, gen)
        if expected is None:
            result.notes.append(f"The Jinja template refuses the probe {[r for r, _ in probe]}.")
            continue
        got = result.bos_prefix + render_go(result.go_template, ollama_values(messages))
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                      min(len(got), len(expected)))
            raise Unsupported(
                f"The Go translation of the {result.family} template renders differently from "
                f"Jinja for roles {[r for r, _ in probe]} at character {at}: Jinja "
                f"{expected[max(0, at - 20):at + 30]!r}, Go {got[max(0, at - 20):at + 30]!r}",
                fix="Write the Modelfile TEMPLATE by hand, or use a standard template.",
                param="chat_template",
            )
        checked += 1
    result.checked = checked
    del template
    return result
