"""``loradock train`` under ``accelerate launch``: two CPU processes over gloo (DDP, QLoRA in each)
match one process with the same global batch.

One process trains with batch 4; two processes train with batch 2 each (global batch 4, the
same rows per optimizer step: accelerate deals each process alternate batches of the one
seeded order) and average gradients over gloo. LoRA dropout is 0 so that no random mask differs
between the runs; the loss of both steps must agree within float32 reduction-order noise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from hub.manifest import AdapterManifest
from tests.train.train_helpers import write_chat_data, write_recipe
from train.metrics import read_metrics
from train.recipe import load_recipe
from train.run import run

COMMON = {"max_steps": 2, "dropout": 0.0, "eval_steps": 0, "save_steps": 0, "max_seq_len": 96,
          "logging_steps": 1, "threads": 1, "learning_rate": 1e-3}
RTOL = 2e-3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(folder) -> list[float]:
    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(store, tmp_path):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=20)
    one = run(load_recipe(write_recipe(tmp_path / "one.yaml", data, tmp_path / "one",
                                       batch_size=4, **COMMON)), store=store, progress=False)
    two_recipe = write_recipe(tmp_path / "two.yaml", data, tmp_path / "two", batch_size=2,
                              **COMMON)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "loradock.cli", "train", str(two_recipe), "--no-eval", "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    manifest = AdapterManifest.read(tmp_path / "two")
    assert manifest.compute["processes"] == 2 and manifest.compute["steps"] == 2
    assert AdapterManifest.read(one.adapter_dir).compute["processes"] == 1
    single, double = _losses(one.adapter_dir), _losses(tmp_path / "two")
    assert len(single) == len(double) == 2  # one writer: no duplicated lines
    assert double == pytest.approx(single, rel=RTOL)
    assert not (tmp_path / "two.work").exists()  # cleaned once, by the main process
