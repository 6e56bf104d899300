"""Our Go text/template subset renders what Go's text/template renders (table-driven).

Expected strings follow Go's documented semantics (text/template package docs): trim markers,
missingkey=zero maps printing ``<no value>``, short-circuit and/or, fmt.Sprint spacing.
"""

from __future__ import annotations

import pytest

from export.gotemplate import GoTemplateError, render

DATA = {
    "A": "x",
    "Empty": "",
    "L": ["a", "b", "c"],
    "M": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}],
    "N": 0,
    "T": True,
}

CASES = [
    ("plain text", "hello", "hello"),
    ("field", "{{ .A }}", "x"),
    ("missing map key", "{{ .Nope }}", "<no value>"),
    ("trim both", "a  {{- .A -}}  \n b", "axb"),
    ("trim needs a space", "a {{-3}}", "a -3"),
    ("comment", "a{{/* note */}}b", "ab"),
    ("trimmed comment", "a \n{{- /* note */ -}}\n b", "ab"),
    ("string escapes", '{{ "a\\nb\\t\\"q\\"" }}', 'a\nb\t"q"'),
    ("raw string", "{{ `a\\n` }}", "a\\n"),
    ("if else", "{{ if .Empty }}y{{ else }}n{{ end }}", "n"),
    ("else if chain", "{{ if .N }}1{{ else if .T }}2{{ else }}3{{ end }}", "2"),
    ("range with index", "{{ range $i, $x := .L }}{{ $i }}={{ $x }};{{ end }}", "0=a;1=b;2=c;"),
    ("range dot", "{{ range .L }}{{ . }}{{ end }}", "abc"),
    ("range else", "{{ range .Nope }}x{{ else }}empty{{ end }}", "empty"),
    ("range int", "{{ range 3 }}{{ . }}{{ end }}", "012"),
    ("break", '{{ range .L }}{{ if eq . "b" }}{{ break }}{{ end }}{{ . }}{{ end }}', "a"),
    ("continue", '{{ range .L }}{{ if eq . "b" }}{{ continue }}{{ end }}{{ . }}{{ end }}', "ac"),
    ("len index slice", "{{ len .L }} {{ index .L 1 }} {{ slice .L 1 }}", "3 b [b c]"),
    ("chained field", "{{ (index .M 1).Role }}", "assistant"),
    ("dollar root", "{{ range .M }}{{ .Role }}/{{ $.A }} {{ end }}", "user/x assistant/x "),
    ("and or not", '{{ and 1 0 }} {{ or 0 "y" }} {{ not .T }}', "0 y false"),
    ("and short-circuits", "{{ and false (index .L 99) }}", "false"),
    ("eq several", '{{ eq .A "q" "x" }} {{ ne .A "x" }}', "true false"),
    ("ordering", "{{ lt 1 2 }} {{ ge 2 3 }}", "true false"),
    ("last element idiom", "{{ range $i, $_ := .L }}{{ if eq (len (slice $.L $i)) 1 }}last"
     "{{ end }}{{ end }}", "last"),
    ("variable assign", "{{ $x := 1 }}{{ if .T }}{{ $x = 2 }}{{ end }}{{ $x }}", "2"),
    ("range scope var", "{{ range $m := .M }}{{ $m.Content }}{{ end }}", "hiyo"),
    ("with", "{{ with .A }}[{{ . }}]{{ else }}none{{ end }}{{ with .Empty }}x{{ else }}-{{ end }}",
     "[x]-"),
    ("pipe", "{{ .L | len }}", "3"),
    ("print spacing", '{{ print 1 2 "a" 3 }}', "1 2a3"),
    ("json", "{{ json .L }}", '["a","b","c"]'),
    ("bool print", "{{ .T }}", "true"),
    ("unicode len is bytes", '{{ len "é" }}', "2"),
]


@pytest.mark.parametrize(("name", "source", "expected"), CASES, ids=[c[0] for c in CASES])
def test_renders_like_go(name: str, source: str, expected: str) -> None:
    assert render(source, DATA) == expected


ERRORS = [
    ("unsupported define", '{{ define "x" }}y{{ end }}'),
    ("unsupported printf", '{{ printf "%s" .A }}'),
    ("unclosed block", "{{ if .A }}x"),
    ("stray end", "x{{ end }}"),
    ("incompatible eq", '{{ eq 1 "a" }}'),
    ("index out of range", "{{ index .L 5 }}"),
    ("undefined variable", "{{ $nope }}"),
    ("field of string", "{{ .A.B }}"),
]


@pytest.mark.parametrize(("name", "source"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_like_go(name: str, source: str) -> None:
    with pytest.raises(GoTemplateError):
        render(source, DATA)
