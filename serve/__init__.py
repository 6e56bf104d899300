"""serve/: the OpenAI-compatible server and its inference engines.

`serve.engine` is the interface every engine implements; `serve.engines` holds the engines
(``peft`` is the embedded default); `serve.runtime` is the peft engine's own model runner
(KV cache, batched multi-LoRA, scheduler, adapter cache); `serve.chat` and `serve.http` are the
server front. Engines know nothing about HTTP or chat templates.
"""
