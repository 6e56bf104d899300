"""The peft engine's runtime: its own model runner and the parts around it.

Base loading, model runner, KV cache, batched LoRA, sampling, adapter cache and scheduler.
Imported only by `serve.engines.peft`; torch is imported lazily inside functions so that
importing a module here stays cheap.
"""
