"""The llamacpp engine honours issue 14's sampling fields: a JSON-schema constraint becomes a
llama.cpp grammar, and ``logit_bias`` / penalties reach its sampler (embedded Q4_1 GGUF base)."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed in this interpreter")

from serve.engine import EngineConfig, GenerationRequest, SamplingParams, create_engine  # noqa: E402

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
          "required": ["colour", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup(base_info, formatter, tmp_path_factory):
    config = EngineConfig(base=base_info, max_model_len=512,
                          options={"cache_dir": str(tmp_path_factory.mktemp("lc-gguf"))})
    engine = create_engine("llamacpp", config)
    asyncio.run(engine.start())
    ids = formatter.encode_chat([{"role": "user", "content": "Name a colour."}], None)
    yield engine, ids
    asyncio.run(engine.shutdown(drain_timeout_s=5))


def _run(engine, ids, name, **params):
    params.setdefault("temperature", 0.0)

    async def go():
        request = GenerationRequest(name, ids, None, SamplingParams(**params))
        return [t for chunk in [c async for c in engine.generate(request)] for t in chunk.token_ids]

    return asyncio.run(go())


def test_json_schema_constraint_becomes_a_llama_cpp_grammar(setup, formatter):
    import jsonschema

    engine, ids = setup
    constraint = formatter.grammars.json_schema(SCHEMA, param="response_format")
    tokens = _run(engine, ids, "lc-json", max_tokens=48, constraint=constraint,
                  stop_token_ids=formatter.stop_token_ids)
    jsonschema.validate(json.loads(formatter.tokenizer.decode(tokens)), SCHEMA)


def test_logit_bias_reaches_the_sampler(setup):
    engine, ids = setup
    free = _run(engine, ids, "lc-free", max_tokens=3)
    banned = _run(engine, ids, "lc-bias", max_tokens=3, logit_bias={free[0]: -100.0})
    assert banned[0] != free[0]
    forced = _run(engine, ids, "lc-force", max_tokens=2, logit_bias={42: 100.0})
    assert forced == [42, 42]
