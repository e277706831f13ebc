"""``minipeft merge --out model.gguf``: the merged model as one llama.cpp file. Read back with
``gguf``'s reader (architecture, tensor types, tokenizer) and loaded here, its logits equal the
merged safetensors folder's after the type's own rounding (F32: the same)."""
from __future__ import annotations

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main
from tests.io.gguf_helpers import gguf, read_folder, roundtrip, write_folder
from tests.io.test_gguf_tokenizer import byte_level_folder
from tests.peft.helpers import assert_logits_close, hf_checkpoint, our_logits, randomize

IDS = np.random.default_rng(7).integers(0, 400, (2, 9))


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = hf_checkpoint(root / "base", vocab_size=400, hidden_size=64, intermediate_size=96,
                         num_attention_heads=4, num_key_value_heads=2)
    byte_level_folder(base, "smollm")  # the tokenizer files go next to the weights
    model = mp.peft.get_peft_model(mp.LlamaForCausalLM.from_pretrained(base), mp.peft.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize(model)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


@pytest.fixture(scope="module")
def merged_folder(base_and_adapter, tmp_path_factory):
    base, adapter = base_and_adapter
    out = tmp_path_factory.mktemp("merged") / "folder"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_merge_writes_a_gguf_that_reads_back(tmp_path, capsys, base_and_adapter, merged_folder, kind):
    base, adapter = base_and_adapter
    out = tmp_path / "merged.gguf"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
                 "--gguf-type", kind]) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout == f"model: {out}\n"
    assert f"wrote GGUF file {out}" in stderr and f"{out.stat().st_size:,} bytes" in stderr
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 400
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["output_norm.weight"] == "F32"
    assert len(types) == 2 * 9 + 3  # 9 per block, embedding, final norm, untied head

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    _, merged = read_folder(merged_folder)
    reference = write_folder(tmp_path / "ref", merged_folder, {k: roundtrip(v, qtype) for k, v in merged.items()})
    got = our_logits(mp.LlamaForCausalLM.from_pretrained(out), IDS)
    assert_logits_close(got, our_logits(mp.LlamaForCausalLM.from_pretrained(reference), IDS), rtol=1e-6)
    tok = mp.Tokenizer.from_pretrained(out)
    assert tok.encode("Lily had 12 balls") == mp.Tokenizer.from_pretrained(merged_folder).encode("Lily had 12 balls")


def test_merge_of_the_bundled_model_to_gguf_then_generate(tmp_path, capsys):
    """The default model (SentencePiece vocabulary, tied head): merge to GGUF, then generate from it."""
    base = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())
    model = mp.peft.get_peft_model(base, mp.peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, scale=0.05)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--gguf-type", "f32"]) == 0
    capsys.readouterr()
    merged = model.merge_and_unload()
    got = our_logits(mp.LlamaForCausalLM.from_pretrained(out), IDS % 512)
    assert_logits_close(got, our_logits(merged, IDS % 512), rtol=1e-6)
    assert main(["generate", "--model", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_merge_refuses_to_overwrite_its_gguf_base(tmp_path, capsys, base_and_adapter):
    base, adapter = base_and_adapter
    gguf_base = tmp_path / "base.gguf"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(gguf_base),
                 "--gguf-type", "f32"]) == 0
    before = gguf_base.read_bytes()
    capsys.readouterr()
    assert main(["merge", "--model", str(gguf_base), "--adapter", str(adapter), "--out", str(gguf_base)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error: --out") and "--model" in err
    assert gguf_base.read_bytes() == before
    # to another file it works, and the tokenizer is copied from the GGUF base
    out = tmp_path / "again.gguf"
    assert main(["merge", "--model", str(gguf_base), "--adapter", str(adapter), "--out", str(out)]) == 0
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("tokenizer.")}
    expected = {k: f.contents() for k, f in gguf.GGUFReader(gguf_base).fields.items() if k.startswith("tokenizer.")}
    assert fields == expected and len(fields["tokenizer.ggml.merges"]) > 100


def test_merge_refuses_a_gguf_out_that_is_a_folder(tmp_path, capsys, base_and_adapter):
    base, adapter = base_and_adapter
    (tmp_path / "x.gguf").mkdir()
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "x.gguf")]) == 1
    assert "is a folder" in capsys.readouterr().err
