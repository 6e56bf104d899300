"""Tiny datasets and recipes for the training tests (a few rows, a few steps, short sequences)."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
CITIES = ["Oslo", "Lima", "Rome", "Kyiv", "Pune", "Bern", "Doha", "Nice"]


def write_chat_data(path: Path, rows: int = 40, seed: int = 1) -> Path:
    """Short JSON-extraction chats (deterministic)."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        name, age, city = f"{rng.choice(NAMES)}{i}", rng.randint(18, 90), rng.choice(CITIES)
        lines.append({"messages": [
            {"role": "user", "content": f"Extract: {name} is {age} and lives in {city}."},
            {"role": "assistant", "content": json.dumps({"name": name, "age": age,
                                                         "city": city})},
        ]})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_preference_data(path: Path, rows: int = 24) -> Path:
    """Short preference pairs: a direct greeting is chosen, a refusal rejected."""
    lines = [
        {"prompt": f"Greet visitor number {i}.", "chosen": f"Hello, visitor {i}! Welcome.",
         "rejected": f"No. Go away, {i}."}
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_recipe(path: Path, data: Path, output: Path, **fields: object) -> Path:
    """A recipe file with small defaults (3 steps, r=4, 96 tokens, 1 thread), ``fields`` winning."""
    values: dict[str, object] = {
        "data": str(data),
        "output": str(output),
        "r": 4,
        "alpha": 8,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "batch_size": 2,
        "max_seq_len": 96,
        "warmup": 0,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 2,
        "seed": 0,
        "threads": 1,  # same float reductions in every process (the resume test compares)
        # float32 numerics, which the resume and distributed tests compare tightly;
        # test_train_fast_path covers the measured choice (compute_dtype: auto).
        "compute_dtype": "float32",
        "intended_use": "tests",
    }
    values.update(fields)
    body = "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items())
    path.write_text(f"# loradock train {path}\n{body}")
    return path
