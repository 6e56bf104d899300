"""The cheap parts of training, without a model: thread defaults, quantisation settings, trainer
arguments, metrics and loss curves, checkpoints discovery and the run's refusals."""

from __future__ import annotations

import json

import pytest

from hub.errors import Conflict
from tests.train.train_helpers import write_chat_data, write_recipe
from train.args import common_args
from train.metrics import plot_losses, read_metrics, truncate_after
from train.quant import QuantSpec
from train.recipe import build_recipe, load_recipe
from train.run import RUN_FILE, latest_checkpoint, run, work_dir_for
from train.threads import default_threads


@pytest.mark.parametrize(
    ("cpus", "load", "threads"),
    [(1, 0.0, 1), (2, 0.0, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 9.0, 1), (16, 0.3, 16), (16, 6.0, 10)],
)
def test_default_threads_use_the_free_cores(cpus, load, threads):
    assert default_threads(cpus, load) == threads


def test_quant_spec_picks_the_compute_dtype_by_device():
    import torch

    cpu, cuda = QuantSpec.for_device("cpu"), QuantSpec.for_device("cuda")
    assert (cpu.compute_dtype, cuda.compute_dtype) == ("float32", "bfloat16")
    config = cpu.bnb_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.float32
    assert cpu.record() == {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                            "compute_dtype": "float32"}


def test_trainer_arguments_are_explicit_about_bf16_and_checkpointing(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", rows=4)
    recipe = build_recipe({"data": str(data), "output": "o", "warmup": 0.1, "max_steps": 0,
                           "epochs": 2, "early_stopping_patience": 2, "eval_steps": 5,
                           "save_steps": 10})
    cpu = common_args(recipe, QuantSpec.for_device("cpu"), tmp_path / "ck", progress=False)
    assert cpu["bf16"] is False and cpu["use_cpu"] is True
    assert cpu["gradient_checkpointing"] is False
    assert cpu["max_steps"] == -1 and cpu["num_train_epochs"] == 2.0
    assert cpu["warmup_steps"] == pytest.approx(0.1) and cpu["lr_scheduler_type"] == "cosine"
    assert cpu["load_best_model_at_end"] and cpu["metric_for_best_model"] == "eval_loss"
    assert cpu["output_dir"] == str(tmp_path / "ck")
    cuda = common_args(recipe, QuantSpec.for_device("cuda"), tmp_path / "ck", progress=False)
    assert cuda["bf16"] is True and cuda["use_cpu"] is False


def test_metrics_truncate_on_resume_and_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "elapsed_s": 2.0 * s, "loss": 3.0 - 0.1 * s} for s in range(1, 7)]
    rows.append({"step": 4, "elapsed_s": 9.0, "eval_loss": 2.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    assert len(read_metrics(path)) == 7  # a torn last line (killed writer) is ignored
    assert truncate_after(path, 4) == {"step": 4, "elapsed_s": 9.0, "eval_loss": 2.5}
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 4]
    png = plot_losses(path, tmp_path / "loss.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for step, state in ((2, "{}"), (4, "{}"), (6, '{"trunc'), (8, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert latest_checkpoint(tmp_path) == (tmp_path / "checkpoint-4", 4)


def test_work_folder_is_a_sibling_of_the_adapter_folder(tmp_path):
    work = work_dir_for(tmp_path / "runs" / "demo")
    assert work == tmp_path / "runs" / "demo.work"
    assert not work.is_relative_to(tmp_path / "runs" / "demo")


def test_run_refuses_to_overwrite_or_restart_over_an_unfinished_run(store, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", rows=8)
    out = tmp_path / "adapter"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", data, out))
    out.mkdir()
    with pytest.raises(Conflict, match="already exists"):
        run(recipe, store=store)
    out.rmdir()
    work = work_dir_for(out)
    work.mkdir()
    with pytest.raises(Conflict) as info:
        run(recipe, store=store)
    assert "--resume" in info.value.fix
    changed = dict(recipe.to_dict(), r=16, learning_rate=0.5)
    (work / RUN_FILE).write_text(json.dumps({"recipe": changed, "base_fingerprint": "x"}))
    with pytest.raises(Conflict) as info:
        run(recipe, store=store, resume=True)
    assert "learning_rate: 0.5 -> 0.001" in info.value.message
    assert "r: 16 -> 4" in info.value.message
