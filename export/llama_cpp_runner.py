"""Run one of llama.cpp's converters (from its unpacked sdist) with two narrow fallbacks.

Executed as a script in a fresh interpreter by `export.llama_convert` (never imported by
loradock): ``python llama_cpp_runner.py TOOL_DIR SCRIPT ARGS...``. The converter puts its own
``gguf-py`` first on ``sys.path``, so it runs against the gguf code it was written for, not the
installed ``gguf`` package.

The fallbacks apply only where the converter would otherwise stop, and parity checks the result:

1. Gemma 2 and Phi-3 read only a SentencePiece ``tokenizer.model``. A folder without one whose
   ``tokenizer.json`` is byte-level BPE (what transformers 5 saves for such tokenizers) goes
   through the converter's own BPE path, as it already does for Gemma 3 and Phi-4.
2. transformers 5 loads any ``qwen2`` folder with ``Qwen2Tokenizer``, which pre-tokenises with
   Qwen2's rule whatever vocabulary it holds; when the converter does not recognise the hash of
   such a tokenizer, it is given llama.cpp's ``qwen2`` pre-tokenizer, the same rule.

Where the job ends: argument passing and these fallbacks; everything else is llama.cpp's code.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def _byte_level_bpe(folder: Path) -> bool:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = json.dumps(tokenizer.get("pre_tokenizer") or {})
    return (tokenizer.get("model") or {}).get("type") == "BPE" and "ByteLevel" in pre


def _install_fallbacks() -> None:
    import conversion.base as base
    from conversion.gemma import Gemma2Model
    from conversion.phi import Phi3MiniModel

    for cls in (Gemma2Model, Phi3MiniModel):
        original = cls.set_vocab

        def set_vocab(self, _original=original) -> None:  # noqa: ANN001
            if not (self.dir_model / "tokenizer.model").is_file() and _byte_level_bpe(
                    self.dir_model):
                self._set_vocab_gpt2()
                return
            _original(self)

        cls.set_vocab = set_vocab

    original_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:  # noqa: ANN001
        try:
            return original_pre(self, tokenizer)
        except NotImplementedError:
            if type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
                return "qwen2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    """Entry point: ``TOOL_DIR SCRIPT ARGS...``."""
    tool_dir = Path(sys.argv[1])
    script = tool_dir / sys.argv[2]
    sys.path[:0] = [str(tool_dir), str(tool_dir / "gguf-py")]
    _install_fallbacks()
    sys.argv = [str(script), *sys.argv[3:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
