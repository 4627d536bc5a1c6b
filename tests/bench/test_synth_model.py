"""bench/synth_model.py: the metadata-only template of the demo model, a random-weight model of the demo model's
shape made from it (same tensor table as the real file, loads and generates in llama.cpp), and the 1.7 B shape's
plan, computed without writing its several GB."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType

from tests.agent.conftest import SMOLLM2
from tests.conftest import REPO
from tests.support.scripts import load_script

TEMPLATE_LIMIT_BYTES = 10 * 2**20
# llama.cpp's llama_token_type: the special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...).
TOKEN_TYPE_CONTROL = 3


synth = load_script(REPO / "bench" / "synth_model.py")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "smollm2.template.gguf"
    synth.write_template(SMOLLM2, path)
    return path


@pytest.fixture(scope="module")
def model_135m(template: Path) -> Path:
    path = template.with_name("smollm2-135m.gguf")
    synth.make_model(template, synth.SHAPES["smollm2-135m"], path, threads=2)
    return path


@functools.cache
def _read(path: Path) -> GGUFReader:
    # Parsing a file's 49,152 tokens and 48,900 merges takes seconds here: once per file.
    return GGUFReader(path)


def _tensor_table(path: Path) -> dict[str, tuple[list[int], str]]:
    return {t.name: (t.shape.tolist(), t.tensor_type.name) for t in _read(path).tensors}


def test_template_keeps_every_metadata_key_and_no_tensors(template: Path) -> None:
    source, copy = _read(SMOLLM2), _read(template)
    assert set(copy.fields) == set(source.fields)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "general.architecture", "llama.block_count"):
        assert copy.fields[key].contents() == source.fields[key].contents(), key
        assert copy.fields[key].types == source.fields[key].types, key
    tokens = copy.fields["tokenizer.ggml.tokens"]
    assert tokens.types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert len(tokens.data) == len(source.fields["tokenizer.ggml.tokens"].data) == 49152
    assert tokens.contents(100) == source.fields["tokenizer.ggml.tokens"].contents(100)
    assert len(copy.fields["tokenizer.ggml.merges"].data) == len(source.fields["tokenizer.ggml.merges"].data)
    assert copy.tensors == []
    assert copy.fields["GGUF.tensor_count"].contents() == 0
    assert template.stat().st_size < TEMPLATE_LIMIT_BYTES


def test_smollm2_135m_model_has_the_demo_models_tensor_table(model_135m: Path) -> None:
    made, real = _tensor_table(model_135m), _tensor_table(SMOLLM2)
    assert len(real) == 272
    # Names, ggml shapes (ne order) and quantization types: token_embd Q8_0, blocks Q4_1, norms F32, no
    # output.weight (tied embedding) in both.
    assert made == real
    metadata = _read(model_135m).fields
    assert metadata["general.file_type"].contents() == synth.FTYPE_Q4_1
    assert "synthetic" in metadata["general.name"].contents()


def test_smollm2_135m_model_loads_and_generates_8_tokens(model_135m: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    token_types = _read(model_135m).fields["tokenizer.ggml.token_type"].contents()
    # Random weights pick arbitrary tokens, and which ones may change with the CPU's kernels (near-ties under
    # greedy decoding); an end-of-generation token would end the completion early. Banning the control tokens,
    # among them every end-of-generation token, makes 8 tokens the one possible outcome on any machine, whatever
    # the argmax; asserting on the text would depend on which tokens won.
    banned = {token: -1000.0 for token, kind in enumerate(token_types) if kind == TOKEN_TYPE_CONTROL}
    assert 2 in banned  # <|im_end|>, the eos token
    llm = llama_cpp.Llama(model_path=str(model_135m), n_ctx=256, n_threads=2, verbose=False)
    try:
        result = llm.create_completion("The quick brown fox", max_tokens=8, temperature=0.0, logit_bias=banned)
    finally:
        llm.close()
    assert result["usage"]["completion_tokens"] == 8
    assert result["choices"][0]["finish_reason"] == "length"


def test_smollm2_1_7b_plan_is_computed_without_writing() -> None:
    shape = synth.SHAPES["smollm2-1.7b"]
    assert shape.ftype == synth.FTYPE_Q4_K_M == 15
    template = synth.read_metadata(SMOLLM2)
    metadata = synth.model_metadata(template, shape)
    dims = shape.resolve(metadata)
    plan = {t.name: (t.shape, t.dtype.name) for t in synth.tensor_plan(dims, synth.n_vocab(metadata))}

    assert plan["token_embd.weight"] == ((49152, 2048), "float16")
    assert "output.weight" not in plan
    assert plan["output_norm.weight"] == ((2048,), "float32")
    assert plan["blk.23.ffn_down.weight"] == ((2048, 8192), "float16")
    assert plan["blk.0.ffn_gate.weight"] == ((8192, 2048), "float16")
    assert plan["blk.0.attn_k.weight"] == ((2048, 2048), "float16")  # 32 KV heads: no grouped-query sharing
    assert "blk.24.attn_q.weight" not in plan
    assert len(plan) == 2 + 24 * 9
    assert 1.6e9 < synth.parameter_count(synth.tensor_plan(dims, 49152)) < 1.8e9

    values = {key: metadata[key].value for key in metadata}
    assert values["llama.embedding_length"] == 2048
    assert values["llama.block_count"] == 24
    assert values["llama.feed_forward_length"] == 8192
    assert values["llama.attention.head_count"] == 32
    assert values["llama.attention.head_count_kv"] == 32
    assert values["llama.rope.dimension_count"] == 64
    assert values["llama.context_length"] == 8192
    assert values["llama.rope.freq_base"] == 130000.0
    assert values["general.file_type"] == synth.FTYPE_F16
    assert "synthetic" in values["general.name"]
    # The rest is the template's: the tokenizer and the norm epsilon.
    assert values["tokenizer.chat_template"] == template["tokenizer.chat_template"].value
    assert len(values["tokenizer.ggml.tokens"]) == 49152
    assert values["llama.attention.layer_norm_rms_epsilon"] == template["llama.attention.layer_norm_rms_epsilon"].value
