"""``minipeft generate`` with transformers' decoding flags, streaming output, ``--chat``, and the
adapter's own base model: outputs equal the API's, bad flags are one-line errors naming the flag."""
from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main
from minipeft.cli.streaming import TextStream

BUNDLED = mp.bundled_model_path()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def bundled():
    return mp.LlamaForCausalLM.from_pretrained(BUNDLED), mp.Tokenizer.from_pretrained(BUNDLED)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, out, err, *needles):
    assert (code, out) == (1, ""), err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minipeft: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----- bad values: one line naming the flag ----------------------------------------------------
def test_top_p_zero_is_refused_instead_of_printing_unk_tokens(capsys):
    line = one_line_error(*run(capsys, "generate", "--prompt", "Once", "--temperature", "0.8", "--top-p", "0"),
                          "--top-p", "(0, 1]")
    assert "top_p" not in line  # the flag, not the Python argument


@pytest.mark.parametrize("flags, flag", [
    (("--temperature", "-1"), "--temperature"), (("--top-k", "-3"), "--top-k"),
    (("--max-new-tokens", "-1"), "--max-new-tokens"), (("--repetition-penalty", "0"), "--repetition-penalty"),
    (("--num-return-sequences", "0"), "--num-return-sequences"),
    (("--num-return-sequences", "2"), "--num-return-sequences"),  # greedy: every copy the same
    (("--do-sample", "--temperature", "0"), "--temperature"),
    (("--stop", ""), "--stop"),
])
def test_bad_decoding_flags_are_one_line_errors(capsys, flags, flag):
    one_line_error(*run(capsys, "generate", "--prompt", "Once", *flags), flag)


def test_flags_greedy_decoding_ignores_are_one_warning_line(capsys, bundled):
    model, tok = bundled
    code, out, err = run(capsys, "generate", "--prompt", "Once upon", "--max-new-tokens", "12", "--top-k", "5")
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("minipeft: warning:")]
    assert warning == ["minipeft: warning: greedy decoding ignores --top-k 5: pass --do-sample to sample"]
    ids = tok.encode("Once upon")
    assert out == tok.decode(model.generate(np.array([ids]), max_new_tokens=12)[0]) + "\n"


# ----- outputs equal the API's -----------------------------------------------------------------
def test_repetition_penalty_flag_gives_the_apis_text(capsys, bundled):
    model, tok = bundled
    code, out, _ = run(capsys, "generate", "--prompt", "Tom and Lily", "--max-new-tokens", "60",
                       "--repetition-penalty", "1.3")
    assert code == 0
    ids = tok.encode("Tom and Lily")
    penalized = tok.decode(model.generate(np.array([ids]), max_new_tokens=60, repetition_penalty=1.3)[0])
    assert out == penalized + "\n"
    assert penalized != tok.decode(model.generate(np.array([ids]), max_new_tokens=60)[0])


def test_stop_flags_end_the_text_as_the_apis_stop_strings(capsys, bundled):
    model, tok = bundled
    code, out, _ = run(capsys, "generate", "--prompt", "Once upon a time", "--max-new-tokens", "60",
                       "--stop", "Lily", "--stop", "park")
    assert code == 0
    ids = tok.encode("Once upon a time")
    stopped = model.generate(np.array([ids]), max_new_tokens=60, stop_strings=["Lily", "park"], tokenizer=tok)
    assert out == tok.decode(stopped[0]) + "\n" and out.rstrip("\n").endswith("Lily")
    assert len(out) < len(tok.decode(model.generate(np.array([ids]), max_new_tokens=60)[0]))


def test_num_return_sequences_prints_one_sampled_line_each(capsys, bundled):
    model, tok = bundled
    code, out, err = run(capsys, "generate", "--prompt", "Tom and Lily", "--max-new-tokens", "15", "--do-sample",
                         "--temperature", "0.9", "--num-return-sequences", "3", "--seed", "2")
    assert code == 0
    ids = tok.encode("Tom and Lily")
    rows = model.generate(np.array([ids]), max_new_tokens=15, do_sample=True, temperature=0.9,
                          num_return_sequences=3, seed=2)
    expected = [tok.decode(row[:len(ids)]) + tok.decode(row)[len(tok.decode(row[:len(ids)])):] for row in rows]
    assert out.splitlines() == expected and len(set(expected)) > 1
    assert "45 tokens" in err


def test_chat_flag_prints_the_reply_to_one_user_turn(capsys, bundled):
    model, tok = bundled
    code, out, _ = run(capsys, "generate", "--chat", "--prompt", "Tell me a story.", "--max-new-tokens", "40")
    assert code == 0
    with warnings.catch_warnings():  # the bundled model has no template of its own: the default one (a warning)
        warnings.simplefilter("ignore")
        text = tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    stop = sorted({*mp.models.generation.stop_ids_of(model), tok.eos_token_id})
    reply = model.generate(np.array([ids]), max_new_tokens=40, eos_token_id=stop)[0, len(ids):]
    assert out == tok.decode(reply) + "\n"
    assert "<|im_start|>" not in out and "Tell me a story." not in out


def test_system_without_chat_is_refused(capsys):
    one_line_error(*run(capsys, "generate", "--system", "Be brief."), "--system", "--chat")


# ----- streaming ----------------------------------------------------------------------------------
class Writes(io.StringIO):
    """stdout that remembers each write."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)
        return super().write(text)


def test_text_stream_holds_back_partial_characters_and_writes_as_tokens_come(bundled):
    _, tok = bundled
    text = "Tom saw héllo wörld 🙂 and 日本 ok"
    ids = tok.encode(text, add_special_tokens=False)
    out = Writes()
    stream = TextStream(tok, [tok.bos_token_id], out)
    for token in ids:
        stream(np.array([token]))
    assert stream.finish() == tok.decode([tok.bos_token_id] + ids) == text
    assert out.getvalue() == text
    assert "\ufffd" not in "".join(out.chunks)  # byte-fallback pieces of 🙂 / 日本 were held back
    assert len([c for c in out.chunks if c]) > 10  # and the rest came token by token


def test_generate_streams_to_stdout_while_generating(capsys, bundled, monkeypatch):
    """The streamer writes during generation: stdout already holds text when the last step runs."""
    model, tok = bundled
    seen_during = []
    real_generate = mp.LlamaForCausalLM.generate

    def spying_generate(self, input_ids, streamer=None, **kwargs):
        def spy(ids):
            streamer(ids)
            seen_during.append(capsys.readouterr().out)
        return real_generate(self, input_ids, streamer=spy, **kwargs)

    monkeypatch.setattr(mp.LlamaForCausalLM, "generate", spying_generate)
    code = main(["generate", "--prompt", "Once upon", "--max-new-tokens", "20"])
    assert code == 0
    assert sum(bool(chunk) for chunk in seen_during) > 10  # text appeared step by step
    full = "".join(seen_during) + capsys.readouterr().out  # the prompt came first, with the first step
    ids = tok.encode("Once upon")
    assert full == tok.decode(real_generate(model, np.array([ids]), max_new_tokens=20)[0]) + "\n"


# ----- the position window -----------------------------------------------------------------------
@pytest.fixture
def short_window(tmp_path):
    folder = tmp_path / "short"
    shutil.copytree(BUNDLED, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    return folder


def test_past_max_positions_warns_or_stops(capsys, short_window):
    code, out, err = run(capsys, "generate", "--model", str(short_window), "--max-new-tokens", "40")
    assert code == 0 and "40 tokens" in err
    assert "minipeft: warning: generation goes past the model's max_position_embeddings (32)" in err
    assert "--past-max-positions 'stop'" in err
    code, out_stopped, err = run(capsys, "generate", "--model", str(short_window), "--max-new-tokens", "40",
                                 "--past-max-positions", "stop")
    assert code == 0 and "31 tokens" in err and "warning" not in err  # BOS + 31 new = 32 positions
    assert out.startswith(out_stopped.removesuffix("\n"))


# ----- --adapter without --model: the adapter's own base ---------------------------------------
@pytest.fixture(scope="module")
def adapter_on_other_base(tmp_path_factory):
    """A random base model (bundled config and tokenizer, other weights) and a LoRA adapter on it."""
    root = tmp_path_factory.mktemp("adapter-base")
    config = mp.LlamaForCausalLM.from_pretrained(BUNDLED).config
    mp.LlamaForCausalLM(config, rng=np.random.default_rng(0)).save_pretrained(root / "base")
    for name in TOKENIZER_FILES:
        shutil.copyfile(f"{BUNDLED}/{name}", root / "base" / name)
    base = mp.LlamaForCausalLM.from_pretrained(root / "base")
    peft = mp.peft.get_peft_model(base, mp.peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data[...] = np.random.default_rng(1).normal(0, 0.5, p.data.shape)
    peft.save_pretrained(root / "adapter")
    return root


def _adapter_text(base_folder, adapter_folder, tok, prompt="Once", n=12):
    model = mp.peft.PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(base_folder), adapter_folder)
    ids = tok.encode(prompt)
    return tok.decode(model.generate(np.array([ids]), max_new_tokens=n)[0]) + "\n"


def test_adapter_without_model_runs_on_its_recorded_base(capsys, adapter_on_other_base, bundled):
    _, tok = bundled
    base, adapter = adapter_on_other_base / "base", adapter_on_other_base / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--prompt", "Once", "--max-new-tokens", "12")
    assert code == 0, err
    assert out == _adapter_text(base, adapter, tok)
    assert out != _adapter_text(BUNDLED, adapter, tok)  # the base made a difference
    assert f"base model: {base}" in err


def test_adapter_with_another_model_warns_and_uses_it(capsys, adapter_on_other_base, bundled):
    _, tok = bundled
    adapter = adapter_on_other_base / "adapter"
    code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--model", BUNDLED, "--prompt", "Once",
                         "--max-new-tokens", "12")
    assert code == 0
    assert out == _adapter_text(BUNDLED, adapter, tok)
    warning = [line for line in err.splitlines() if line.startswith("minipeft: warning:")]
    assert len(warning) == 1 and "is not the model the adapter was trained on" in warning[0]
    assert str(adapter_on_other_base / "base") in warning[0]
    code, _, err = run(capsys, "generate", "--adapter", str(adapter), "--model", str(adapter_on_other_base / "base"),
                       "--max-new-tokens", "2")
    assert code == 0 and "warning" not in err  # the same model: nothing to say


def test_adapter_whose_base_is_a_hub_id_falls_back_to_the_bundled_model_and_says_so(capsys, adapter_on_other_base,
                                                                                  tmp_path, bundled):
    _, tok = bundled
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_on_other_base / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "generate", "--adapter", str(adapter), "--prompt", "Once", "--max-new-tokens", "12")
    assert code == 0
    assert out == _adapter_text(BUNDLED, adapter, tok)
    assert "'HuggingFaceTB/SmolLM2-135M' is not a local folder; using the bundled model (pass --model)" in err


def test_a_prompt_longer_than_the_window_is_one_line_and_prints_nothing(capsys, short_window):
    one_line_error(*run(capsys, "generate", "--model", str(short_window), "--prompt", "the cat sat on the mat " * 8),
                   "--prompt", "max_position_embeddings (32)")
