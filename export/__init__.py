"""export/: merged HF folders, GGUF files and LoRAs, Ollama builds — each gated on parity.

Entry points: `export.pipeline` (merged, gguf, lora-gguf) and `export.ollama`; the CLI is
`loradock/cli_export.py`. Conversions live in `merge`, `gguf_writer` (+ `gguf_tokenizer`),
`lora_gguf` and `quantize`; checks in `parity` and `templates` (+ `gotemplate`).
"""
