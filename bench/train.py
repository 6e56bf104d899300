"""Benchmark `loradock train` against the plain TRL QLoRA recipe; every figure is a ratio.

    nice -n 10 .venv/bin/python bench/train.py                 # 12 steps each (~5 min idle)
    nice -n 10 .venv/bin/python bench/train.py --steps 6 --threads-sweep 1,2

Both sides train the same rows (the train split loradock prepared from ``--recipe``'s data),
with the same QLoRA settings (NF4 double-quant base; LoRA r, alpha, dropout, targets), batch
size, sequence limit, learning rate, schedule, seed, step count and torch thread count, no
gradient checkpointing, no evaluation and no checkpoints, and the same compute dtype:

- loradock: ``loradock train RECIPE --no-eval --set max_steps=N ...`` in a subprocess. Its
  compute dtype is measured (`train.dtype_choice`, recorded in the manifest); on a CPU with
  AVX512-BF16 that is bfloat16.
- plain: the seeds' recipe written out here (`plain_worker`): ``BitsAndBytesConfig`` (nf4,
  double quant) + ``LoraConfig`` + TRL ``SFTTrainer`` in its own subprocess, in the compute
  dtype loradock chose, set the way TRL's and bitsandbytes' documents set it: for bfloat16,
  ``bnb_4bit_compute_dtype=torch.bfloat16``, the model loaded in bfloat16 and
  ``SFTConfig(bf16=True)``; for float32, float32 throughout and ``bf16=False``. TRL's defaults
  stay as they are there: it casts the LoRA weights of a quantised model to bf16 and trains on
  all tokens (assistant-only loss needs the generation-marker template that loradock derives).

Printed per side: seconds per optimizer step (wall, steps 2..N, so the first step's warm-up is
left out), tokens per second over the same steps (TRL's ``num_tokens``: input tokens, padding
excluded, the same rows on both sides), CPU seconds per step (steadier when other work shares
the cores) and peak RSS of the process (``wait4``); then loradock / plain for each. The issue's
goal is loradock >= 1.25x the plain recipe's tokens/s at <= 1.0x its peak RSS.
``--threads-sweep`` also times loradock alone at each thread count (how `train.threads` picked
its default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _wait(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; return (exit status, wall seconds, peak RSS in MiB) of that child alone."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - started, usage.ru_maxrss / 1024


def _bf16_flags() -> list[str]:
    """The CPU flags that decide bf16 speed (AVX512-BF16, AMX), from ``/proc/cpuinfo``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def _tokens_per_step(tokens: list[tuple[int, float]]) -> float:
    """Mean input tokens per optimizer step from cumulative (step, num_tokens), steps 2..N."""
    marks = sorted(tokens)
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (t1 - t0) / (s1 - s0) if s1 > s0 else float("nan")


def _per_step(times: list[tuple[int, float, float]]) -> tuple[float, float]:
    """(wall s/step, CPU s/step) from (step, elapsed, cpu) marks, excluding step 1."""
    marks = sorted(times)
    (s0, w0, c0), (s1, w1, c1) = marks[0], marks[-1]
    if s1 <= s0:
        return float("nan"), float("nan")
    return (w1 - w0) / (s1 - s0), (c1 - c0) / (s1 - s0)


def run_loradock(recipe: Path, steps: int, threads: int, work: Path, env: dict) -> dict:
    """Train with the CLI; read the step clocks from its metrics.jsonl."""
    out = work / f"loradock-t{threads}"
    cmd = [sys.executable, "-m", "loradock.cli", "train", str(recipe), "--out", str(out),
           "--no-eval", "--no-progress", "--set", f"max_steps={steps}", "--set", "eval_steps=0",
           "--set", "save_steps=0", "--set", "early_stopping_patience=0", "--set",
           "logging_steps=1", "--set", f"threads={threads}", "--set", "keep_checkpoints=false"]
    code, wall, rss = _wait(cmd, env, work / f"loradock-t{threads}.log")
    if code != 0:
        raise SystemExit(f"loradock train failed ({code}); see {work}/loradock-t{threads}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    marks = [(r["step"], r["elapsed_s"], r["cpu_s"]) for r in rows if "loss" in r]
    step_s, cpu_s = _per_step(marks)
    tokens = _tokens_per_step([(r["step"], r["num_tokens"]) for r in rows
                               if isinstance(r.get("num_tokens"), float)])
    manifest = json.loads((out / "loradock.json").read_text())
    return {"s_per_step": step_s, "tokens_per_s": tokens / step_s, "cpu_s_per_step": cpu_s,
            "peak_rss_mib": rss, "process_wall_s": wall, "data_dir": str(out / "data"),
            "adapter": str(out), "compute_dtype": manifest["quantization"]["compute_dtype"],
            "dtype_choice": manifest["compute"].get("dtype_choice")}


def run_plain(recipe: Path, data_dir: Path, steps: int, threads: int, work: Path,
              env: dict, dtype_name: str) -> dict:
    """Train with the plain recipe in a subprocess of this script."""
    result = work / "plain.json"
    cmd = [sys.executable, __file__, "--plain-worker", str(recipe), "--data-dir", str(data_dir),
           "--steps", str(steps), "--threads", str(threads), "--result", str(result),
           "--dtype", dtype_name]
    code, wall, rss = _wait(cmd, env, work / "plain.log")
    if code != 0:
        raise SystemExit(f"plain recipe failed ({code}); see {work}/plain.log")
    saved = json.loads(result.read_text())
    step_s, cpu_s = _per_step([tuple(m) for m in saved["marks"]])
    tokens = _tokens_per_step([tuple(t) for t in saved["tokens"]])
    return {"s_per_step": step_s, "tokens_per_s": tokens / step_s, "cpu_s_per_step": cpu_s,
            "peak_rss_mib": rss, "process_wall_s": wall}


def plain_worker(recipe_path: Path, data_dir: Path, steps: int, threads: int,
                 result: Path, dtype_name: str = "float32") -> None:
    """The seeds' plain QLoRA SFT recipe, with the recipe's settings (runs in its own process)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer

    from hub.store import Store
    from train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    torch.set_num_threads(threads)
    base = Store().base(recipe.base)
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    dtype = getattr(torch, dtype_name)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base.path, quantization_config=quant,
                                                 dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    lora = LoraConfig(r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                      target_modules=recipe.target_modules, task_type="CAUSAL_LM")
    marks: list[tuple[int, float, float]] = []
    tokens: list[tuple[int, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            marks.append((state.global_step, time.monotonic(), time.process_time()))

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003
            if logs and "num_tokens" in logs and "loss" in logs:
                tokens.append((state.global_step, float(logs["num_tokens"])))

    config = SFTConfig(
        output_dir=str(result.parent / "plain-out"), max_length=recipe.max_seq_len,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation,
        learning_rate=recipe.learning_rate, max_steps=steps, warmup_steps=recipe.warmup,
        lr_scheduler_type=recipe.lr_schedule, max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed, bf16=dtype == torch.bfloat16, gradient_checkpointing=False, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    result.write_text(json.dumps({"marks": marks, "tokens": tokens}))


def main() -> None:
    """Parse arguments, run both sides, print the figures and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path,
                        default=REPO / "examples" / "json-extract" / "recipe.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="0: train.threads default")
    parser.add_argument("--threads-sweep", default="", help="e.g. 1,2: loradock at each count")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--plain-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker, args.data_dir, args.steps, args.threads, args.result,
                     args.dtype)
        return

    from train.threads import default_threads

    threads = args.threads or default_threads()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        ours = run_loradock(args.recipe, args.steps, threads, work, env)
        plain = run_plain(args.recipe, Path(ours["data_dir"]), args.steps, threads, work, env,
                          ours["compute_dtype"])
        sweep = {}
        for count in [int(c) for c in args.threads_sweep.split(",") if c.strip()]:
            sweep[count] = (ours if count == threads
                            else run_loradock(args.recipe, args.steps, count, work, env))
    figures = {
        "steps": args.steps, "threads": threads, "recipe": str(args.recipe),
        "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
        "compute_dtype": ours["compute_dtype"], "dtype_choice": ours["dtype_choice"],
        "cpu_bf16_flags": _bf16_flags(),
        "loradock": {k: v for k, v in ours.items()
                     if k not in ("data_dir", "adapter", "compute_dtype", "dtype_choice")},
        "plain": plain,
        "ratio_loradock_over_plain": {
            key: ours[key] / plain[key]
            for key in ("s_per_step", "tokens_per_s", "cpu_s_per_step", "peak_rss_mib")
        },
        "goal": {"tokens_per_s_ratio_at_least": 1.25, "peak_rss_ratio_at_most": 1.0},
        "threads_sweep": {str(k): {"s_per_step": v["s_per_step"],
                                   "cpu_s_per_step": v["cpu_s_per_step"]}
                          for k, v in sweep.items()},
    }
    print(f"QLoRA SFT, {args.steps} steps, {threads} torch thread(s), recipe {args.recipe.name}; "
          f"load average {load_before:.1f} -> {figures['loadavg_1min_after']:.1f} "
          f"on {os.cpu_count()} CPUs")
    choice = ours["dtype_choice"] or {}
    print(f"compute dtype (both sides): {ours['compute_dtype']} - {choice.get('reason', '')}; "
          f"CPU bf16 flags: {' '.join(figures['cpu_bf16_flags']) or 'none'}")
    print(f"{'':10} {'s/step':>8} {'tokens/s':>9} {'CPU s/step':>11} {'peak RSS MiB':>13}")
    for name, side in (("loradock", ours), ("plain", plain)):
        print(f"{name:10} {side['s_per_step']:8.2f} {side['tokens_per_s']:9.1f} "
              f"{side['cpu_s_per_step']:11.2f} {side['peak_rss_mib']:13.0f}")
    ratio = figures["ratio_loradock_over_plain"]
    print(f"{'ratio':10} {ratio['s_per_step']:8.2f} {ratio['tokens_per_s']:9.2f} "
          f"{ratio['cpu_s_per_step']:11.2f} {ratio['peak_rss_mib']:13.2f}   (loradock / plain)")
    met = ratio["tokens_per_s"] >= 1.25 and ratio["peak_rss_mib"] <= 1.0
    print(f"goal (tokens/s >= 1.25x, peak RSS <= 1.0x): {'met' if met else 'NOT met'}")
    for count, side in figures["threads_sweep"].items():
        print(f"loradock with {count} thread(s): {side['s_per_step']:.2f} s/step, "
              f"{side['cpu_s_per_step']:.2f} CPU s/step")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
