"""Inference engines, each in its own module, imported only when chosen (`serve.engine.ENGINES`).

Heavy dependencies (torch, transformers, vllm, llama_cpp) are imported inside each engine module,
never here.
"""
