"""Evaluation of an adapter against its base and a few-shot baseline (issue 3, "Evaluation").

``run_eval`` is the entry point; heavy libraries (torch, transformers, peft) are imported only
when it runs. Modules: `metrics` (text metrics), `scoring` (token log-likelihoods), `generate`
(models, prompts, greedy decoding), `forgetting` (general-text check), `report` (verdict, files),
`run` (orchestration).
"""

from train.eval.run import EvalResult, run_eval

__all__ = ["EvalResult", "run_eval"]
