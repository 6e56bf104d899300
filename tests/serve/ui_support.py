"""Helpers for the console tests: a demo-like adapter folder and a headless Chromium.

`demo_like_folder` turns the modelcards tests' evaluated adapter (real LoRA, real `run_eval`)
into what `loradock train` leaves: a manifest, ``loss.png`` and a model card written by
`modelcards.write_card`. `chromium` launches Debian's Chromium through Playwright, or skips
with the reason when either is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def demo_like_folder(evaluated_adapter: Path, base_info, out: Path, name: str) -> Path:
    """A copy of ``evaluated_adapter`` with manifest, loss.png and README.md card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelcards import write_card
    from tests.modelcards.conftest import make_manifest

    folder = out / name
    shutil.copytree(evaluated_adapter, folder)
    make_manifest(base_info).write(folder)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    steps = list(range(0, 61, 10))
    ax.plot(steps, [2.1, 1.4, 1.0, 0.8, 0.7, 0.65, 0.6], label="train")
    ax.plot(steps[1:], [1.5, 1.1, 0.9, 0.85, 0.8, 0.8], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png")
    plt.close(fig)
    write_card(folder, base_info, name=name, version=1)
    return folder


def chromium_browser(playwright):
    """Launch Debian's Chromium headless with the flags that keep it off the network."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def require_chromium() -> None:
    """Skip the calling test when Playwright or Chromium is missing, saying which."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; "
                    ".ci/run does this)")


def screenshot(page, name: str) -> Path:
    """Save a small PNG of ``page`` as docs/screenshots/NAME.png (256 colours)."""
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), full_page=False)
    with Image.open(raw) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True)
    raw.unlink()
    return path
