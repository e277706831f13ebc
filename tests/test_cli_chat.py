"""``minipeft chat`` fed through stdin: each reply equals the API's greedy reply to the conversation
so far rendered by the chat template, /reset forgets, /exit and end of input end, and input that
cannot be answered is said in one line instead of a traceback."""
from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main
from minipeft.models.generation import stop_ids_of

BUNDLED = mp.bundled_model_path()


@pytest.fixture(scope="module")
def bundled():
    return mp.LlamaForCausalLM.from_pretrained(BUNDLED), mp.Tokenizer.from_pretrained(BUNDLED)


def chat(capsys, monkeypatch, lines: str, *argv):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = main(["chat", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def api_reply(model, tok, messages, max_new_tokens) -> str:
    """What the chat should answer: greedy from the rendered conversation, to a stop id or EOS."""
    with warnings.catch_warnings():  # the bundled model has no template: the default one, with a warning
        warnings.simplefilter("ignore")
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    stop = sorted({*stop_ids_of(model), tok.eos_token_id})
    return tok.decode(model.generate(np.array([ids]), max_new_tokens=max_new_tokens, eos_token_id=stop)[0, len(ids):])


def test_two_turns_keep_the_history_and_reset_forgets_it(capsys, monkeypatch, bundled):
    model, tok = bundled
    code, out, err = chat(capsys, monkeypatch, "Hello there.\nTell me about the cat.\n/reset\nTell me about the cat.\n",
                          "--max-new-tokens", "24")
    assert code == 0, err
    first = api_reply(model, tok, [{"role": "user", "content": "Hello there."}], 24)
    history = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": first.strip()},
               {"role": "user", "content": "Tell me about the cat."}]
    second = api_reply(model, tok, history, 24)
    fresh = api_reply(model, tok, history[2:], 24)
    assert second != fresh  # the history changes the reply, so the comparisons below see it
    assert out == first + "\n" + second + "\n" + fresh + "\n"
    assert "(history cleared)" in err and "Traceback" not in err


def test_later_turns_run_only_their_new_tokens(capsys, monkeypatch, bundled):
    """The conversation's keys and values stay between turns (PromptCache): turn 2 computes its
    new message, not the history; the replies are the fresh ones (the test above)."""
    turns = []  # (prompt tokens, tokens taken from the cache) per turn

    class Recording(mp.PromptCache):
        def next_logits(self, model, ids, *args):
            step = super().next_logits(model, ids, *args)

            def first_records(*step_args):
                out = step(*step_args)
                if len(turns) < calls[0]:
                    turns.append((ids.shape[1], self.reused))
                return out

            calls[0] += 1
            return first_records

    calls = [0]
    monkeypatch.setattr("minipeft.cli.chat.PromptCache", Recording)
    code, out, err = chat(capsys, monkeypatch, "Hello there.\nTell me about the cat.\n", "--max-new-tokens", "24")
    assert code == 0, err
    (first_len, first_reused), (second_len, second_reused) = turns
    assert first_reused == 0 and first_len < second_reused < second_len


def test_stop_ends_each_reply_at_its_string(capsys, monkeypatch, bundled):
    model, tok = bundled
    code, out, err = chat(capsys, monkeypatch, "Hello there.\n", "--max-new-tokens", "40", "--stop", ".")
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = tok.apply_chat_template([{"role": "user", "content": "Hello there."}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    stop = sorted({*stop_ids_of(model), tok.eos_token_id})
    reply = model.generate(np.array([ids]), max_new_tokens=40, eos_token_id=stop, stop_strings=["."], tokenizer=tok)
    expected = tok.decode(reply[0, len(ids):])
    assert out == expected + "\n" and expected.endswith(".")
    assert len(expected) < len(api_reply(model, tok, [{"role": "user", "content": "Hello there."}], 40))


def test_exit_and_end_of_input_end_the_chat(capsys, monkeypatch, bundled):
    model, tok = bundled
    code, out, _ = chat(capsys, monkeypatch, "Hi\n/exit\nnot read\n", "--max-new-tokens", "8")
    assert code == 0
    assert out == api_reply(model, tok, [{"role": "user", "content": "Hi"}], 8) + "\n"
    code, out, err = chat(capsys, monkeypatch, "", "--max-new-tokens", "8")
    assert (code, out) == (0, "") and "/exit" in err  # the greeting names the commands


def test_system_message_and_sampling_flags_reach_the_reply(capsys, monkeypatch, bundled):
    model, tok = bundled
    code, out, _ = chat(capsys, monkeypatch, "Hi\n", "--system", "You tell stories.", "--max-new-tokens", "16",
                        "--do-sample", "--temperature", "0.8", "--seed", "4")
    assert code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = tok.apply_chat_template([{"role": "system", "content": "You tell stories."},
                                        {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    stop = sorted({*stop_ids_of(model), tok.eos_token_id})
    row = model.generate(np.array([ids]), max_new_tokens=16, eos_token_id=stop, do_sample=True, temperature=0.8,
                         seed=4)[0]
    assert out == tok.decode(row[len(ids):]) + "\n"


def test_bad_sampling_flag_is_one_line_before_reading_anything(capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, "Hi\n", "--top-p", "1.5")
    assert (code, out) == (1, "")
    assert err.splitlines() == [err.strip()] and err.startswith("minipeft: error: --top-p must be in (0, 1]")


def test_several_replies_per_turn_are_refused(capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, "Hi\n", "--do-sample", "--num-return-sequences", "2")
    assert (code, out) == (1, "") and "--num-return-sequences must be 1" in err


def test_a_conversation_longer_than_the_model_reads_is_not_sent(capsys, monkeypatch, tmp_path, bundled):
    _, tok = bundled
    folder = tmp_path / "short"
    shutil.copytree(BUNDLED, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    long_line = "the cat sat on the mat " * 10
    code, out, err = chat(capsys, monkeypatch, f"{long_line}\nHi\n", "--model", str(folder), "--max-new-tokens", "4")
    assert code == 0, err
    assert "the model reads at most 48: not sent; /reset to start over" in err
    assert out.count("\n") == 1  # "Hi" was still answered
