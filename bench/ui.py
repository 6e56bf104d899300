"""Benchmark the web console: page render times with 200 adapters in the hub (goal: < 300 ms).

    nice -n 10 .venv/bin/python bench/ui.py              # ~1 min on 2 busy cores
    nice -n 10 .venv/bin/python bench/ui.py --adapters 50 --requests 10

Setup: a temporary store with ``--adapters`` registered versions of one small real PEFT LoRA
(rank 2 on q_proj, made on the real SmolLM2 base), each folder with a manifest, ``loss.png``,
a model card written by `modelcards.write_card` and an ``eval.json`` in the shape train writes
(figures made up: the page renders them, nobody reads them). A real server on 127.0.0.1
(`serve.server.BackgroundServer`, fake engine: these pages never generate text) with
``--api-keys`` and an admin key, so every page also pays the key check.

Prints, per page, the first (cold: nothing cached) and the median and p95 of ``--requests``
HTTP requests in ms, timed from the request to the last byte, and each median as a ratio to
``GET /v1/models`` (the API's own listing of the same hub, measured in the same run). With
Chromium installed it also prints the browser's ms from navigation start to the last byte of
the page, to DOMContentLoaded, to the first contentful paint and to the load event.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KEY = "sk-bench-console-0123456789"
GOAL_MS = 300.0


def make_folder(root: Path) -> Path:
    """One adapter folder shaped like a training run's output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hub.store import Store
    from modelcards import write_card
    from tests.factories import load_base_model, make_lora
    from tests.modelcards.conftest import make_manifest

    base = Store(root / "base-home").base("smollm2")
    folder = make_lora(load_base_model(base), root / "adapter", r=2, targets=("q_proj",))
    make_manifest(base).write(folder)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot([0, 10, 20, 30], [2.0, 1.2, 0.9, 0.8])
    fig.savefig(folder / "loss.png")
    plt.close(fig)
    write_card(folder, base, name="bench", version=1)
    worst = [{"line": i, "prompt": f"Name as JSON: I am person {i}.", "reference": '{"name": "x"}',
              "adapter": '{"name": "y"}', "score": 0.0} for i in range(5)]
    systems = {s: {"exact_match": 0.5, "rouge_l": 0.75, "json_validity": 1.0, "perplexity": 2.5}
               for s in ("base", "few_shot", "adapter")}
    (folder / "eval.json").write_text(json.dumps({
        "systems": systems, "primary_metric": "exact_match", "worst_examples": worst,
        "verdict": {"passed": True, "sentence": "The adapter beats the 1-shot base.", "rule": "r"},
        "forgetting": {"sentence": "No forgetting detected."}, "data": {"evaluated": 30},
    }))
    return folder


def timed(client, path: str, n: int) -> tuple[float, list[float]]:
    """First request's ms and the ms of ``n`` more."""
    def once() -> float:
        started = time.perf_counter()
        response = client.get(path)
        response.read()
        assert response.status_code == 200, (path, response.status_code)
        return (time.perf_counter() - started) * 1000

    first = once()
    return first, [once() for _ in range(n)]


def browser_times(url: str, paths: list[str]) -> dict[str, tuple[float, ...]]:
    """Chromium's ms from navigation to response end, DOM ready, first paint, load (medians)."""
    try:
        from playwright.sync_api import sync_playwright

        from tests.serve.ui_support import CHROMIUM, chromium_browser
    except ImportError:
        return {}
    if not CHROMIUM.is_file():
        return {}
    out = {}
    with sync_playwright() as playwright:
        browser = chromium_browser(playwright)
        context = browser.new_context()
        context.add_cookies([{"name": "loradock_key", "value": KEY, "url": url}])
        page = context.new_page()
        for path in paths:
            samples = []
            for _ in range(3):
                page.goto(url + path, wait_until="load")
                samples.append(page.evaluate(
                    "(() => { const t = performance.getEntriesByType('navigation')[0];"
                    " const p = performance.getEntriesByName('first-contentful-paint')[0];"
                    " return [t.responseEnd - t.startTime, t.domContentLoadedEventEnd"
                    " - t.startTime, p ? p.startTime : NaN, t.loadEventEnd - t.startTime];"
                    " })()"))
            out[path] = tuple(statistics.median(x) for x in zip(*samples, strict=True))
        browser.close()
    return out


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    test_cache = REPO / ".cache" / "test" / "bases"
    if test_cache.is_dir():
        os.environ.setdefault("LORADOCK_CACHE", str(test_cache))
    import httpx

    from hub.store import Store
    from serve.server import BackgroundServer, ServerConfig

    root = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    try:
        folder = make_folder(root)
        store = Store(root / "home")
        started = time.perf_counter()
        for i in range(args.adapters):
            store.register(folder, f"adapter-{i:03d}")
        print(f"registered {args.adapters} adapters in {time.perf_counter() - started:.1f} s")
        keys = root / "keys.yaml"
        keys.write_text(f"{KEY}: {{name: bench, admin: true}}\n")
        config = ServerConfig(engine="fake", port=0, home=root / "home", api_keys=keys,
                              log_level="warning")
        pages = [
            ("/v1/models", "GET /v1/models (baseline)"),
            ("/", f"hub, {args.adapters} adapters, page 1"),
            ("/?page=1000", "hub, last page"),
            ("/?q=adapter-1", "hub, search all"),
            ("/ui/adapters/adapter-007/1/", "adapter page"),
            ("/ui/playground", "playground"),
            ("/ui/server", "server"),
        ]
        server = BackgroundServer(config)
        with server as url, httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            results = {path: timed(client, path, args.requests) for path, _ in pages}
            browser = browser_times(url, [p for p, _ in pages[1:]])
            from serve.ui.catalog import _facts_cached, warm_facts

            _facts_cached.cache_clear()
            started = time.perf_counter()
            warm_facts(server.state)
            uncached_ms = (time.perf_counter() - started) * 1000
        baseline = statistics.median(results["/v1/models"][1])
        print(f"\n{'page':32} {'cold ms':>8} {'median':>8} {'p95':>8} {'vs /v1/models':>14}"
              f"  browser ms: response, DOM ready, first paint, load")
        worst = 0.0
        for path, label in pages:
            first, samples = results[path]
            median = statistics.median(samples)
            p95 = sorted(samples)[max(0, int(len(samples) * 0.95) - 1)]
            shown = ("{:6.0f} {:6.0f} {:6.0f} {:6.0f}".format(*browser[path]) if path in browser
                     else "")
            print(f"{label:32} {first:8.1f} {median:8.1f} {p95:8.1f} {median / baseline:13.2f}x"
                  f" {shown}")
            if path != "/v1/models":
                worst = max(worst, first, p95)
        print(f"\nhub facts of {args.adapters} versions read uncached: {uncached_ms:.0f} ms (once "
              "per version, by a background thread at server start)")
        verdict = "meets" if worst < GOAL_MS else "MISSES"
        print(f"\nslowest page (cold or p95): {worst:.1f} ms: {verdict} the {GOAL_MS:.0f} ms goal")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
