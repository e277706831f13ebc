"""Stop strings: the same ids as transformers' ``generate(stop_strings=..., tokenizer=...)``; a row
ends at the token that completes a stop string (and keeps it), never for one already in the prompt;
rows end on their own; a character split across tokens still matches; bad values are refused."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.errors import InputError
from minipeft.models.stop_strings import StopStrings

PROMPTS = ["Once upon a time", "Lily and Ben went to the park", "One day"]
STOPS = [["."], ["park"], ["Lily", "Tom"], ['said, "'], ["xyzzy"]]


@pytest.mark.parametrize("stops", STOPS, ids=str)
def test_the_same_ids_as_transformers(bundled, oracles, stops):
    torch, transformers = oracles
    model, tok = bundled
    path = str(model.name_or_path)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs_tok = transformers.AutoTokenizer.from_pretrained(path)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = model.generate(np.array([ids]), max_new_tokens=60, stop_strings=stops, tokenizer=tok)
        with torch.no_grad():
            theirs = theirs_model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False,
                                           stop_strings=stops, tokenizer=theirs_tok).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{prompt!r} {stops}")


def test_a_row_ends_at_the_token_that_completes_the_string(bundled):
    model, tok = bundled
    ids = tok.encode("Once upon a time")
    free = model.generate(np.array([ids]), max_new_tokens=60)[0]
    stopped = model.generate(np.array([ids]), max_new_tokens=60, stop_strings=["Lily"], tokenizer=tok)[0]
    assert len(stopped) < len(free) and np.array_equal(stopped, free[:len(stopped)])
    new = stopped[len(ids):]
    assert "Lily" in tok.decode(new, skip_special_tokens=False)
    assert "Lily" not in tok.decode(new[:-1], skip_special_tokens=False)  # the last token completed it


def test_a_stop_string_in_the_prompt_ends_nothing(bundled):
    model, tok = bundled
    ids = tok.encode("Lily and Ben went to the park")
    free = model.generate(np.array([ids]), max_new_tokens=20)
    np.testing.assert_array_equal(model.generate(np.array([ids]), max_new_tokens=20, stop_strings=["park", "Lily"],
                                                 tokenizer=tok), free)


def test_rows_end_on_their_own_and_padding_is_not_text(bundled):
    """Two left-padded rows: each gives what it gives alone (then pad ids)."""
    model, tok = bundled
    short, long = tok.encode("One day"), tok.encode("Once upon a time")
    width = len(long)
    batch = np.array([[0] * (width - len(short)) + short, long])
    mask = np.array([[0] * (width - len(short)) + [1] * len(short), [1] * width])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=40, stop_strings=["."], tokenizer=tok,
                         pad_token_id=0)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(np.array([prompt]), max_new_tokens=40, stop_strings=["."], tokenizer=tok)[0]
        got = out[row, width:]
        np.testing.assert_array_equal(got[:len(alone) - len(prompt)], alone[len(prompt):])
        assert (got[len(alone) - len(prompt):] == 0).all()


class BytesTokenizer:
    """Ids are bytes: a character of several UTF-8 bytes spans several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_still_matches():
    stopper, tok = StopStrings(["é!"], BytesTokenizer()), BytesTokenizer()
    text = "xé!".encode()  # x, 0xC3, 0xA9, !
    ended = []
    for end in range(1, len(text) + 1):
        ids = np.array([list(text[:end])])
        ended.append(bool(stopper.ended(ids, np.ones_like(ids), np.array([True]))[0]))
    assert ended == [False, False, False, True] and tok.decode(list(text)) == "xé!"
    accent = StopStrings(["é"], tok)
    ids = np.array([list("xé".encode())])
    assert accent.ended(ids, np.ones_like(ids), np.array([True]))[0]  # completed by its second byte
    assert not accent.ended(ids[:, :2], np.ones_like(ids[:, :2]), np.array([True]))[0]  # half a character


@pytest.mark.parametrize("stops, tokenizer, match", [
    (["."], None, "needs the tokenizer"),
    ([""], BytesTokenizer(), "non-empty strings"),
    ([], BytesTokenizer(), "non-empty strings"),
    ([3], BytesTokenizer(), "non-empty strings"),
    (3, BytesTokenizer(), "non-empty strings"),
])
def test_bad_stop_strings_are_refused(random_model, stops, tokenizer, match):
    with pytest.raises(InputError, match=match):
        random_model().generate(np.array([[1, 2]]), stop_strings=stops, tokenizer=tokenizer)
