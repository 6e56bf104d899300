"""`loradock data check/prepare` through the real CLI entry point (exit codes, stdout, stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loradock.cli import main
from tests.train.test_data_hub import hub  # noqa: F401 - the stand-in Hub fixture

REPO = Path(__file__).resolve().parents[2]
BAD_CHAT = Path(__file__).parent / "data" / "bad_chat.jsonl"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``loradock ARGV`` in this process; return exit code, stdout and stderr."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unusable_file_exits_nonzero_with_one_line_on_stderr(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('not json\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    env = {**os.environ, "LORADOCK_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "loradock.cli", "data", "check", str(source), "--no-length"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no usable row" in lines[0]
    assert "line 1: malformed" in result.stdout and "line 2: role_order" in result.stdout


def test_check_prints_counts_then_problems_with_lines(capsys):
    code, out, err = run(["data", "check", str(BAD_CHAT), "--no-length"], capsys)
    assert code == 0 and err == ""
    assert "rows: 17 read, 5 usable, 12 dropped" in out
    assert out.index("dropped:") < out.index("problems (")
    assert "line 7: role_order (dropped)" in out and "line 14: pii (redacted)" in out


def test_check_json_and_forced_format(capsys):
    code, out, _ = run(["data", "check", str(BAD_CHAT), "--no-length", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["rows_kept"] == 5 and data["format"] == "chat"
    assert data["dropped_lines"]["malformed"] == [2, 3, 4, 5]
    code, out, err = run(
        ["data", "check", str(BAD_CHAT), "--no-length", "--format", "alpaca"], capsys
    )
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_prepare_writes_the_folder(tmp_path, capsys):
    out = tmp_path / "prepared"
    code, stdout, err = run(
        ["data", "prepare", str(BAD_CHAT), "--out", str(out), "--no-length", "--pii", "drop",
         "--seed", "3"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "data_report.json").read_text())
    assert report["pii_policy"] == "drop" and report["seed"] == 3 and report["rows_kept"] == 4
    assert sum(report["splits"].values()) == 4
    assert "wrote" in stdout
    code, _, err = run(["data", "prepare", str(BAD_CHAT), "--out", str(out), "--no-length"], capsys)
    assert code != 0 and "already exists" in err


def test_check_with_the_base_tokenizer(home, base_info, capsys):
    code, out, _ = run(["data", "check", str(BAD_CHAT), "--max-seq-len", "128"], capsys)
    assert code == 0
    assert "line 16: too_long (dropped)" in out and "(limit 128)" in out


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_help_has_an_example(command, capsys):
    code, out, _ = run(["data", command, "--help"], capsys)
    assert code == 0 and "Example: loradock data " + command in out


def test_data_commands_take_a_hub_dataset(hub, tmp_path, capsys):  # noqa: F811
    from tests.train.test_data_hub import _jsonl

    sha = hub.add("acme/greetings", {"data/train.jsonl": _jsonl(6, "hi")})
    code, out, _ = run(["data", "check", "hf://datasets/acme/greetings", "--no-length"], capsys)
    assert code == 0 and "6 usable" in out
    out_dir = tmp_path / "prepared"
    code, _, _ = run(["data", "prepare", "hf://datasets/acme/greetings", "--no-length",
                      "--out", str(out_dir)], capsys)
    saved = json.loads((out_dir / "data_report.json").read_text())
    assert code == 0 and saved["origin"]["sha"] == sha


def test_min_answer_tokens_drops_short_answers_with_their_lines(home, base_info, tmp_path,
                                                               capsys):
    source = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say something {i}."},
                          {"role": "assistant", "content": "ok" if i == 2 else
                           f"Here is a longer answer number {i}, with several words."}]}
            for i in range(1, 5)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(["data", "check", str(source), "--min-answer-tokens", "4"], capsys)
    assert code == 0 and "3 usable" in out
    assert "line 2:" in out and "min_answer_tokens 4" in out


def test_min_answer_tokens_without_the_tokenizer_is_refused(capsys):
    code, _, err = run(["data", "check", str(BAD_CHAT), "--no-length", "--min-answer-tokens",
                        "3"], capsys)
    assert code != 0 and "--no-length" in err and "--min-answer-tokens 3" in err
