"""Chat templates: the same strings and ids as transformers' apply_chat_template (on SmolLM2's
template and on a template written here), where templates are read from, the default for a
model without one, the sandbox, and the errors."""
from __future__ import annotations

import warnings

import pytest

from minipeft.data import bundled_model_path
from minipeft.errors import ConfigError, InputError
from minipeft.io import Tokenizer
from minipeft.io.chat_template import DEFAULT_CHAT_TEMPLATE, assistant_spans, render_chat
from tests.io.chat_fixtures import GENERATION_MARKED, SMOLLM2_CHAT_TEMPLATE, chatml_tokenizer_folder

SYSTEM = {"role": "system", "content": "You answer in one word."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
CONVERSATIONS = [
    [USER],
    [SYSTEM, USER, ASSISTANT],
    [USER, ASSISTANT, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": 'é <b>&</b> "quotes" \\ and\nnewlines  '}, {"role": "assistant", "content": ""}],
]

# A template written for this test: whitespace control (trim_blocks / lstrip_blocks decide
# which newlines and indents survive), bos/eos variables, raise_exception, loop controls,
# namespace, the tojson filter (transformers' version: no HTML escaping), `tools is defined`.
TEST_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(users=0) %}
{% for message in messages %}
    {% if message['content'] == 'SKIP' %}
        {% continue %}
    {% endif %}
    {% if message['role'] == 'system' %}
<<SYS>> {{ message['content'] | trim }} <</SYS>>
    {% elif message['role'] == 'user' %}
        {% set ns.users = ns.users + 1 %}
[USER {{ ns.users }}] {{ message['content'] }}
    {% elif message['role'] == 'assistant' %}
[ASSISTANT] {{ message['content'] }}{{ eos_token }}
    {% else %}
{{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{%- endif %}
{% if tools is defined and tools is not none %}TOOLS{% endif %}
meta={{ {'users': ns.users, 'text': messages[0]['content']} | tojson }}
"""

# transformers' former class-level default (ChatML), which DEFAULT_CHAT_TEMPLATE equals when the
# tokenizer's EOS is <|im_end|>
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return chatml_tokenizer_folder(tmp_path_factory.mktemp("smollm2_like"))


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(folder):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the oracle)")
    return transformers.AutoTokenizer.from_pretrained(folder)


def _hf_ids(hf, messages, **kwargs):
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_smollm2_template_matches_transformers(tok, hf, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == _hf_ids(hf, messages, add_generation_prompt=generation_prompt)
    assert ids == tok.encode(ours, add_special_tokens=False)  # the template's specials, none added


def test_smollm2_template_string_by_hand(tok):
    # the default system prompt appears only when the conversation has none
    assert tok.apply_chat_template([USER], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([SYSTEM, USER]).startswith("<|im_start|>system\nYou answer in one word.")
    ids = tok.apply_chat_template([USER], tokenize=True)
    assert ids[0] == tok.backend.token_to_id("<|im_start|>") and ids.count(tok.eos_token_id) == 2


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_written_template_matches_transformers(tok, hf, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation] + [{"role": "user", "content": "SKIP"}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, chat_template=TEST_TEMPLATE)
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                    chat_template=TEST_TEMPLATE)
    assert ours == theirs
    assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                   chat_template=TEST_TEMPLATE) == \
        _hf_ids(hf, messages, add_generation_prompt=generation_prompt, chat_template=TEST_TEMPLATE)


def test_written_template_by_hand(tok):
    text = tok.apply_chat_template([SYSTEM, USER, ASSISTANT], add_generation_prompt=True,
                                   chat_template=TEST_TEMPLATE)
    assert text == ("<|im_start|><<SYS>> You answer in one word. <</SYS>>\n"
                    "[USER 1] What is the capital of France?\n[ASSISTANT] Paris.<|im_end|>\n[ASSISTANT]"
                    'meta={"users": 1, "text": "You answer in one word."}')  # "-%}" ate the newline
    # tojson keeps non-ASCII and HTML characters as they are, as transformers' filter does
    assert 'meta={"users": 1, "text": "é <b>' in tok.apply_chat_template(CONVERSATIONS[3], chat_template=TEST_TEMPLATE)


def test_raise_exception_is_an_input_error(tok, hf):
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(InputError, match="Unknown role: tool"):
        tok.apply_chat_template(messages, chat_template=TEST_TEMPLATE)
    with pytest.raises(Exception, match="Unknown role: tool"):  # transformers refuses it too
        hf.apply_chat_template(messages, tokenize=False, chat_template=TEST_TEMPLATE)


def test_none_values_are_dropped_as_in_transformers(tok, hf):
    template = "{% for m in messages %}{{ m.role }}:{{ m.name if m.name is defined else '-' }};{% endfor %}"
    messages = [{"role": "user", "content": "a", "name": None}, {"role": "assistant", "content": "b", "name": "x"}]
    ours = tok.apply_chat_template(messages, chat_template=template)
    assert ours == "user:-;assistant:x;"
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x rendered the None ("user:None;")
        assert ours == hf.apply_chat_template(messages, tokenize=False, chat_template=template)


# ----- where the template comes from ---------------------------------------------------
def test_list_form_takes_default_and_names(tmp_path, hf):
    transformers = pytest.importorskip("transformers")
    templates = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TEST_TEMPLATE}]
    folder = chatml_tokenizer_folder(tmp_path / "named", chat_template=templates)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template == CHATML and tok.chat_templates == {"tool_use": TEST_TEMPLATE}
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for name in (None, "tool_use"):
        assert tok.apply_chat_template([USER, ASSISTANT], chat_template=name) == \
            theirs.apply_chat_template([USER, ASSISTANT], tokenize=False, chat_template=name)


def test_several_templates_without_default_must_be_named(tmp_path):
    folder = chatml_tokenizer_folder(tmp_path / "nodefault", chat_template=[{"name": "a", "template": CHATML}])
    tok = Tokenizer.from_pretrained(folder)
    with pytest.raises(ConfigError, match=r"none is 'default'.*\['a'\]"):
        tok.apply_chat_template([USER])
    assert tok.apply_chat_template([USER], chat_template="a").startswith("<|im_start|>user")


def test_chat_template_jinja_file_wins(tmp_path):
    folder = chatml_tokenizer_folder(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "plain.jinja").write_text("{{ messages[0].content }}", encoding="utf-8")
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template == CHATML and tok.chat_templates == {"plain": "{{ messages[0].content }}"}
    assert tok.apply_chat_template([USER], chat_template="plain") == USER["content"]


@pytest.mark.parametrize("value, match", [
    (42, "chat_template must be a string or a list"),
    ([{"name": "default"}], r"chat_template\[0\] must be an object with string 'name' and 'template'"),
])
def test_malformed_template_config_names_the_file(tmp_path, value, match):
    folder = chatml_tokenizer_folder(tmp_path / "bad", chat_template=value)
    with pytest.raises(ConfigError, match=match) as info:
        Tokenizer.from_pretrained(folder)
    assert "tokenizer_config.json" in str(info.value)


def test_chat_template_can_be_set(tok):
    # a GGUF loader (or a user) sets the attribute; apply_chat_template follows it
    other = Tokenizer(tok.backend, tok.bos_token_id, tok.eos_token_id, chat_template=CHATML)
    assert other.apply_chat_template([USER]) == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    other.chat_template = "{{ messages | length }}"
    assert other.apply_chat_template([USER, ASSISTANT]) == "2"


# ----- the default template ------------------------------------------------------------
def test_default_template_on_the_bundled_model_warns_once():
    tok = Tokenizer.from_pretrained(bundled_model_path())
    assert tok.chat_template is None
    with pytest.warns(UserWarning, match="no chat template; using minipeft's default"):
        text = tok.apply_chat_template([SYSTEM, USER, ASSISTANT], add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nYou answer in one word.</s>\n<|im_start|>user\n"
                    "What is the capital of France?</s>\n<|im_start|>assistant\nParis.</s>\n<|im_start|>assistant\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call stays silent
        ids = tok.apply_chat_template([USER, ASSISTANT], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 2  # BOS first, EOS ends each turn
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s> <|im_start|>user")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_default_template_on_the_bundled_model_matches_transformers(generation_prompt):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the oracle)")
    hf = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
    tok = Tokenizer(Tokenizer.from_pretrained(bundled_model_path()).backend, 1, 2, chat_template=DEFAULT_CHAT_TEMPLATE)
    messages = [SYSTEM, {"role": "user", "content": "Hi  there, é😀"}, ASSISTANT, USER]
    kwargs = dict(add_generation_prompt=generation_prompt, chat_template=DEFAULT_CHAT_TEMPLATE)
    assert tok.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert tok.apply_chat_template(messages, tokenize=True, **kwargs) == _hf_ids(hf, messages, **kwargs)


def test_default_template_is_chatml_when_eos_is_im_end(tmp_path, hf):
    tok = Tokenizer.from_pretrained(chatml_tokenizer_folder(tmp_path / "none", chat_template=None))
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            assert ours == hf.apply_chat_template(messages, tokenize=False, chat_template=CHATML,
                                                  add_generation_prompt=generation_prompt)
    assert render_chat(DEFAULT_CHAT_TEMPLATE, [USER], special_tokens={"eos_token": "<|im_end|>"}) == \
        render_chat(CHATML, [USER])


# ----- sandbox and errors ---------------------------------------------------------------
@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}",
                                      "{% set ns = namespace(_x=1) %}",
                                      "{{ cycler.__init__.__globals__ }}"])
def test_sandbox_refuses_escapes(tok, template):
    with pytest.raises(ConfigError, match="sandbox forbids"):
        tok.apply_chat_template([USER], chat_template=template)


def test_template_that_is_not_a_string(tok):
    other = Tokenizer(tok.backend, chat_template=["{{ messages }}"])
    with pytest.raises(ConfigError, match="a chat template must be a string, got list"):
        other.apply_chat_template([USER])


def test_syntax_error_names_the_line(tok):
    with pytest.raises(ConfigError, match="chat template line 2: .*endfor"):
        tok.apply_chat_template([USER], chat_template="{% for m in messages %}\n{{ m.content }}")


@pytest.mark.parametrize("messages, match", [
    ([], "empty conversation"),
    ("hello", "messages must be a list"),
    ([USER, "hi"], r"messages\[1\] must be a dict"),
])
def test_malformed_messages(tok, messages, match):
    with pytest.raises(InputError, match=match):
        tok.apply_chat_template(messages)


# ----- assistant spans (the data side checks them token by token) ----------------------


@pytest.mark.parametrize("conversation", [1, 2, 3])
def test_prefix_spans_equal_generation_spans(conversation):
    messages = CONVERSATIONS[conversation]
    text, spans = assistant_spans(SMOLLM2_CHAT_TEMPLATE, messages)
    marked_text, marked_spans = assistant_spans(GENERATION_MARKED, messages)
    assert text == marked_text == render_chat(SMOLLM2_CHAT_TEMPLATE, messages)
    learned = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [text[a:b] for a, b in spans] == learned
    assert [text[a:b] for a, b in marked_spans] == learned


def test_template_without_prefix_spans_is_refused():
    # drops every earlier assistant turn once a later one exists, like some "thinking" templates
    template = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
                "{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = CONVERSATIONS[2]
    with pytest.raises(InputError, match="assistant message 1.*generation"):
        assistant_spans(template, messages)
    text, spans = assistant_spans(template, messages[:2])  # one assistant turn: fine
    assert [text[a:b] for a, b in spans] == ["Paris."]
