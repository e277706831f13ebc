"""Chat templates: a conversation rendered to one string by the model's own Jinja template.

A chat model is trained on conversations written in one exact format (ChatML's
``<|im_start|>user\\n...<|im_end|>``, Llama's ``[INST] ... [/INST]``, ...). Hugging Face
ships that format with the tokenizer as a Jinja template (``chat_template`` in
``tokenizer_config.json``, or a ``chat_template.jinja`` file; GGUF files carry it as
``tokenizer.chat_template``). This module renders such a template exactly as
transformers' ``apply_chat_template`` does (transformers, ``utils/chat_template_utils.py``),
so the same messages give the same string here and there:

* a sandboxed environment (``jinja2.sandbox.ImmutableSandboxedEnvironment``): templates
  come from model repositories and are untrusted code;
* ``trim_blocks=True, lstrip_blocks=True`` and the ``loopcontrols`` extension;
* the globals ``raise_exception(msg)`` (-> an error), ``strftime_now(fmt)``, a limited
  ``dict`` and a ``namespace`` that refuses underscore names, and a ``tojson`` filter that
  is plain ``json.dumps`` (``ensure_ascii=False``; Jinja's own escapes HTML characters);
* the variables ``messages``, ``add_generation_prompt``, ``tools=None``, ``documents=None``
  and the special tokens (``bos_token``, ``eos_token``, ...); message keys whose value is
  None are dropped first, as transformers does.

Which characters of a rendered conversation the assistant wrote (for training with the
loss on assistant turns only, :func:`assistant_spans`):

* if the template marks them with ``{% generation %} ... {% endgeneration %}`` (the
  markers transformers' ``return_assistant_tokens_mask`` reads), exactly those spans;
* otherwise by rendering prefixes: the conversation up to assistant message i with the
  generation prompt, P_i, and up to and including it, Q_i. Both must begin the whole
  rendering; the assistant's span is Q_i[len(P_i):] without trailing whitespace, i.e. its
  content and the end-of-turn token the template writes after it (``<|im_end|>``,
  ``</s>``, ``<|eot_id|>``), never the role header or the newline after the end token.
  A template that renders earlier turns differently once later ones exist (some
  "thinking" templates drop old reasoning) has no such spans and is refused by name.

:data:`DEFAULT_CHAT_TEMPLATE` is used for a model that ships no template (the bundled
stories260K has none); see its comment for what it writes and why.
"""
from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError, InputError

# The default for a model without a template: ChatML turns (transformers' former class-level
# default, ``<|im_start|>{role}\n{content}<|im_end|>\n``), with two changes so that a base
# model fine-tuned on it works with plain EOS stopping: the model's BOS comes first (LLaMA-family
# models always saw it at position 0; not when BOS is <|im_start|> itself, which would double it),
# and each turn ends with the model's EOS token where ChatML writes <|im_end|>. For a tokenizer
# whose EOS *is* <|im_end|> (SmolLM2, Qwen), this is ChatML exactly. For the bundled model a
# conversation reads
# "<s><|im_start|>user\nHi</s>\n<|im_start|>assistant\nHello</s>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token and bos_token != '<|im_start|>' %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + (eos_token or '<|im_end|>') + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _GenerationTracker(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and, while tracking, notes
    where in the output the body went (transformers' ``AssistantTracker``)."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self._tracking = ContextVar("minipeft_generation_tracking", default=None)
        environment.extend(track_generation=self.track)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)  # blocks = everything yielded before this one
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list, spans: list):
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates, without the class itself (no attribute tricks on it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore attributes (a path to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace, got {name!r}")


def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by its text); a syntax error is a ConfigError with its line."""
    if not isinstance(source, str):
        raise ConfigError(f"a chat template must be a string, got {type(source).__name__}")
    return _compile(source)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template line {exc.lineno}: {exc.message}") from None


def _plain_messages(messages) -> list[dict]:
    """Fresh copies of the messages without None values (as transformers), checked to be dicts."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise InputError("cannot apply a chat template to an empty conversation; give at least one message")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        plain.append({key: value for key, value in message.items() if value is not None})
    return plain


def _variables(messages, add_generation_prompt: bool, special_tokens: dict) -> dict:
    # tools / documents are passed as None, as transformers does, so `tools is defined` agrees
    tokens = {name: value for name, value in special_tokens.items() if value is not None}
    return dict(tokens, messages=messages, tools=None, documents=None,
                add_generation_prompt=bool(add_generation_prompt))


@contextmanager
def _template_errors(what: str = "the messages"):
    """Jinja's errors as minipeft's: the sandbox refusing an operation is the template's fault
    (ConfigError); anything else (``raise_exception``, a missing key) is a refusal of the input."""
    try:
        yield
    except jinja2.exceptions.SecurityError as exc:
        raise ConfigError(f"the chat template tried an operation the sandbox forbids: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the chat template refused {what}: {exc}") from None


def render_chat(template: str, messages, add_generation_prompt: bool = False,
                special_tokens: dict | None = None) -> str:
    """The conversation as one string, as transformers' ``apply_chat_template(tokenize=False)``.

    ``special_tokens`` maps names (``bos_token``, ``eos_token``, ...) to token strings.
    Errors: InputError for malformed messages or when the template refuses them
    (``raise_exception``, a missing key); ConfigError for a template that does not parse or
    that tries what the sandbox forbids (``''.__class__``, ``messages.append``).
    """
    compiled = compile_template(template)
    variables = _variables(_plain_messages(messages), add_generation_prompt, special_tokens or {})
    with _template_errors():
        return compiled.render(**variables)


def _generation_spans(compiled, messages, special_tokens) -> tuple[str, list[tuple[int, int]]]:
    blocks, spans = [], []
    with compiled.environment.track_generation(blocks, spans):
        for block in compiled.generate(**_variables(messages, False, special_tokens)):
            blocks.append(block)
    return "".join(blocks), spans


def assistant_spans(template: str, messages, special_tokens: dict | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character spans the assistant wrote]).

    See the module docstring for how the spans are found. No generation prompt is added.
    Raises InputError when the template cannot give prefix-stable spans.
    """
    special_tokens = special_tokens or {}
    messages = _plain_messages(messages)
    compiled = compile_template(template)
    if _GENERATION_TAG.search(template):
        with _template_errors():
            return _generation_spans(compiled, messages, special_tokens)
    full = render_chat(template, messages, False, special_tokens)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render_chat(template, messages[:i], True, special_tokens) if i else \
            _render_empty(compiled, special_tokens)
        through = render_chat(template, messages[:i + 1], False, special_tokens)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise InputError(
                f"cannot tell which characters assistant message {i} wrote: the chat template does not "
                "render the conversation up to it (with the generation prompt) as the beginning of the "
                "whole conversation; mark the assistant's text with {% generation %}...{% endgeneration %} "
                "in the template, as transformers' return_assistant_tokens_mask expects")
        end = len(before) + len(through[len(before):].rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def _render_empty(compiled, special_tokens) -> str:
    """The generation prompt of an empty conversation (render_chat refuses empty ones)."""
    with _template_errors("a conversation that starts with the assistant"):
        return compiled.render(**_variables([], True, special_tokens))
