"""Fuzzing the loaders: valid files (a safetensors file, a model folder's ``config.json`` and
weights, an adapter's ``adapter_config.json``, a JSONL data file) are mutated byte by byte and
field by field, and loading each must either raise one of the project's own errors
(:class:`~minipeft.errors.MiniPeftError`) or succeed. Never another exception, never a hang
(each example runs under a generous alarm), never a silently wrong load: a safetensors file we
accept must give exactly the arrays the reference ``safetensors`` package gives, and a mutation
that changes nothing must give exactly the unmutated logits.

The GGUF header is fuzzed with the GGUF reader's tests."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.autograd import no_grad
from minipeft.errors import DataError, MiniPeftError
from minipeft.io.safetensors import read_safetensors, write_safetensors
from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from minipeft.train import build_dataset, read_jsonl
from tests.peft.helpers import randomize, tiny_model
from tests.train.train_helpers import CharTokenizer

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IDS = np.array([[1, 5, 9, 2, 7]])


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail an example that takes minutes where milliseconds are expected (a hang or an
    unbounded allocation); a guard, not a measurement."""
    def alarm(*_):
        raise AssertionError(f"loading took more than {seconds} s: a hang or an unbounded allocation")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def logits(model) -> np.ndarray:
    with no_grad():
        return model(IDS).logits.numpy()


# ----- mutations -----------------------------------------------------------------------------
SPECIAL = st.sampled_from([0, -1, 1, 3, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 9, 1e-300, 1e300, math.nan, math.inf,
                           -math.inf, "", "8", "(", "\ud800", "LORA", "F32", "I32", "BOOL", [], {}, [0], [2, 2], None, True])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6) | SPECIAL,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """One to three edits: overwrite, insert, delete, truncate or append bytes."""
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate", "append"]))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if kind == "overwrite":
            data = data[:i] + chunk + data[i + len(chunk):]
        elif kind == "insert":
            data = data[:i] + chunk + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 16)):]
        elif kind == "truncate":
            data = data[:i]
        else:
            data = data + chunk
    return data


def set_path(value, path: list, new):
    """A copy of the JSON ``value`` with the item at ``path`` replaced (deleted when ``new`` is DELETE)."""
    if not path:
        return new
    value = dict(value) if isinstance(value, dict) else list(value)
    head = path[0]
    if len(path) > 1:
        value[head] = set_path(value[head], path[1:], new)
    elif new is DELETE:
        del value[head]
    else:
        value[head] = new
    return value


DELETE = object()


@st.composite
def mutated_json(draw, value: dict):
    """Replace, delete or add a field at any depth, one to three times."""
    for _ in range(draw(st.integers(1, 3))):
        path, node = [], value
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            path.append(key)
            node = node[key]
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        if kind == "add" and isinstance(node, dict):
            path.append(draw(st.text(max_size=8)))
            value = set_path(value, path, draw(JSON_VALUES))
        elif kind == "delete" and path:
            value = set_path(value, path, DELETE)
        else:
            value = set_path(value, path, draw(JSON_VALUES))
    return value


def dump(value) -> str:
    return json.dumps(value)  # NaN / Infinity written as Python's json writes them, as users' tools do


# ----- safetensors: every accepted file reads as the reference reads it ----------------------------
@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "seed.safetensors"
    rng = np.random.default_rng(0)
    write_safetensors(path, {"w": rng.normal(size=(3, 4)).astype(np.float32),
                             "h": rng.normal(size=(5,)).astype(np.float16),
                             "i": np.arange(6, dtype=np.int32).reshape(2, 3),
                             "empty": np.zeros((0, 2), np.float32)}, {"format": "pt"})
    return path.read_bytes()


def same_as_reference(path: Path, ours: dict) -> None:
    """What we accepted, the reference accepts too, with the same dtypes, shapes and bytes."""
    try:
        reference_numpy = pytest.importorskip("safetensors.numpy")
    except pytest.skip.Exception:
        return  # without the package only the error classes are checked
    reference = reference_numpy.load_file(str(path))
    assert sorted(reference) == sorted(ours)
    for key, array in ours.items():
        ref = reference[key]
        assert (ref.dtype, ref.shape, ref.tobytes()) == (array.dtype, array.shape, array.tobytes()), key


def header_and_data(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@st.composite
def mutated_safetensors(draw, raw: bytes) -> bytes:
    if draw(st.booleans()):
        return draw(mutated_bytes(raw))
    header, data = header_and_data(raw)
    text = dump(draw(mutated_json(header))).encode()
    size = len(text) + draw(st.sampled_from([0, 0, 0, -1, 1, 8]))
    return struct.pack("<Q", max(size, 0)) + text + data


@FUZZ
@given(st.data())
def test_mutated_safetensors_is_refused_or_read_as_the_reference_reads_it(tmp_path, safetensors_file, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data.draw(mutated_safetensors(safetensors_file)))
    with no_hang():
        try:
            ours = read_safetensors(path)
        except MiniPeftError:
            event("refused")
            return
    event("loaded")
    same_as_reference(path, ours)


# ----- model folders: config.json and weights ----------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "model"
    tiny_model(0, tie_word_embeddings=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_files(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    return config, (model_dir / "model.safetensors").read_bytes(), logits(mp.LlamaForCausalLM.from_pretrained(model_dir))


def load_and_run(folder):
    """Load a model and run it: only MiniPeftError may come out of either; returns logits or None."""
    with no_hang():
        try:
            out = logits(mp.LlamaForCausalLM.from_pretrained(folder))
        except MiniPeftError as exc:
            event(f"refused: {type(exc).__name__}")
            return None
    event("loaded")
    return out


@FUZZ
@given(st.data())
def test_mutated_config_json_is_refused_or_loads(tmp_path, model_dir, model_files, data):
    config, weights, expected = model_files
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    if data.draw(st.booleans()):
        mutated = data.draw(mutated_json(config))
        (folder / "config.json").write_text(dump(mutated))
        no_op = dump(mutated) == dump(config)  # not ==: 0 == False, but config.json's types are checked
    else:
        (folder / "config.json").write_bytes(data.draw(mutated_bytes(dump(config).encode())))
        no_op = False
    got = load_and_run(folder)
    if no_op:
        np.testing.assert_array_equal(got, expected)


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_mutated_model_weights_are_refused_or_load(tmp_path, model_dir, model_files, data):
    config, weights, _ = model_files
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(dump(config))
    (folder / "model.safetensors").write_bytes(data.draw(mutated_safetensors(weights)))
    load_and_run(folder)


# ----- adapters -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir):
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    peft = get_peft_model(mp.LlamaForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize(peft)
    peft.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, (folder / "adapter_model.safetensors").read_bytes(), logits(peft.eval())


@FUZZ
@given(st.data())
def test_mutated_adapter_config_is_refused_or_loads(tmp_path, model_dir, adapter, data):
    config, weights, expected = adapter
    folder = tmp_path / "a"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    if data.draw(st.integers(0, 3)):
        mutated = data.draw(mutated_json(config))
        (folder / "adapter_config.json").write_text(dump(mutated))
        no_op = dump(mutated) == dump(config)  # not ==: 0 == False, but config.json's types are checked
    else:
        (folder / "adapter_config.json").write_bytes(data.draw(mutated_bytes(dump(config).encode())))
        no_op = False
    got = load_adapter(model_dir, folder)
    if no_op and got is not None:
        np.testing.assert_array_equal(got, expected)


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_mutated_adapter_weights_are_refused_or_load(tmp_path, model_dir, adapter, data):
    config, weights, _ = adapter
    folder = tmp_path / "a"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(dump(config))
    (folder / "adapter_model.safetensors").write_bytes(data.draw(mutated_safetensors(weights)))
    got = load_adapter(model_dir, folder)
    assert got is None or got.shape == (1, IDS.shape[1], config_vocab(model_dir))


def load_adapter(model_dir, folder):
    """The adapted model's logits, or None when minipeft refused the folder (any other exception,
    or a hang, fails the test)."""
    with no_hang():
        try:
            got = logits(PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(model_dir), folder))
        except MiniPeftError as exc:
            event(f"refused: {type(exc).__name__}")
            return None
    event("loaded")
    return got


def config_vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


# ----- JSONL training data ---------------------------------------------------------------------------
JSONL_SEEDS = [  # one record shape per file; chat "messages" need a tokenizer with a template
    [{"text": "once upon a time"}, {"text": "there was a cat"}],
    [{"prompt": "Q: 2+2?", "completion": " 4"}, {"prompt": "Q: 1+1?", "completion": " 2"}],
    [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say no", "output": "no"}],
]


@FUZZ
@given(st.data())
def test_mutated_jsonl_is_refused_or_loads(tmp_path, data):
    seed = data.draw(st.sampled_from(JSONL_SEEDS))
    lines = [dump(r) for r in seed]
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = dump(data.draw(mutated_json(seed[i])))
        text = "\n".join(lines).encode()
    else:
        text = data.draw(mutated_bytes("\n".join(lines).encode()))
    path = tmp_path / "data.jsonl"
    path.write_bytes(text)
    with no_hang():
        try:
            build_dataset(read_jsonl(path), CharTokenizer(pad_token_id=0), seq_len=32)
        except DataError:
            event("refused")
            return
    event("loaded")
