"""FishMask: Fisher scores equal a hand computation, the mask is their global top-k, training moves
exactly those k entries, and the sparse file applied to the base weights is the trained model."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main

from minipeft.errors import CheckpointError, ConfigError
from minipeft.io import read_safetensors
from minipeft.nn import Linear
from minipeft.peft import FishMaskConfig, PeftModel, get_peft_model
from minipeft.peft.core.names import PREFIX, WEIGHTS_NAME
from minipeft.peft.selective import fisher
from minipeft.peft.selective.weight_delta import sparse_layers
from minipeft.train import Trainer, TrainingArguments
from minipeft.train.batches import collate
from minipeft.train.data import Dataset, Example
from tests.helpers.gradcheck import numerical_gradient
from tests.peft.helpers import TINIER, logits, tiny_model, token_ids

TARGETS = ["q_proj", "v_proj", "down_proj"]


def fishmask_count(base, config: FishMaskConfig) -> int:
    """The docstring's k = int(n · keep_ratio), n = Σ out·in over the targeted Linears."""
    n = sum(m.weight.size for name, m in base.named_modules() if isinstance(m, Linear)
            and any(name.endswith("." + t) for t in config.target_modules))
    return int(n * config.keep_ratio)


def examples(seed=5, n=6, length=7, vocab=TINIER["vocab_size"]):
    rows = np.random.default_rng(seed).integers(0, vocab, (n, length))
    lengths = [length - i % 3 for i in range(n)]  # ragged, so batches carry padding
    return [Example(r[:k], r[:k].copy(), f"row {i}") for i, (r, k) in enumerate(zip(rows, lengths))]


def batches_of(exs, size):
    return [collate(exs[i:i + size], 0) for i in range(0, len(exs), size)]


def weight_of(model, path):
    module = model.get_submodule(path)
    return getattr(module, "base_layer", module).weight


def hand_fisher(exs, paths, limit):
    """Σ over the first ``limit`` examples, one at a time, of (∂L/∂W)² by the plain model's autograd."""
    model = tiny_model(0, dtype=np.float64, size=TINIER)
    for p in model.parameters():
        p.requires_grad = False
    weights = [weight_of(model, p) for p in paths]
    total = [np.zeros(w.shape) for w in weights]
    for e in exs[:limit]:
        for w in weights:
            w.requires_grad, w.grad = True, None
        model(e.input_ids[None], labels=e.labels[None]).loss.backward()
        for t, w in zip(total, weights):
            t += w.grad ** 2
    return total


def test_fisher_scores_are_summed_squared_per_example_gradients():
    config = FishMaskConfig(keep_ratio=0.05, num_samples=4, target_modules=TARGETS)
    peft_model = get_peft_model(tiny_model(0, dtype=np.float64, size=TINIER), config)
    exs = examples()
    layers = sparse_layers(peft_model, "default")
    paths, weights = [p for p, _ in layers], [layer.base_layer.weight for _, layer in layers]
    # batches of 3 are split into single examples; only the first num_samples count
    ours, seen = fisher.fisher_scores(peft_model, weights, fisher.examples_of(batches_of(exs, 3), 4))
    assert seen == 4
    for o, h in zip(ours, hand_fisher(exs, paths, 4)):
        np.testing.assert_allclose(o, h, rtol=1e-10, atol=1e-14)
    assert not any(w.requires_grad for w in weights)  # the frozen base stays frozen
    absolute, _ = fisher.fisher_scores(peft_model, weights, fisher.examples_of(batches_of(exs, 3), 1), square=False)
    np.testing.assert_allclose(absolute[0] ** 2, hand_fisher(exs, paths, 1)[0], rtol=1e-10, atol=1e-14)

    # one entry by float64 central differences of the per-example losses, as a second witness
    base = tiny_model(0, dtype=np.float64, size=TINIER)
    w = weight_of(base, paths[0])
    original = w.data.copy()

    def loss_of(e):
        def f(arrays):
            w.data = original.copy()
            w.data[0, 1] = arrays[0][0]
            return base(e.input_ids[None], labels=e.labels[None]).loss.item()
        return f

    fd = sum(numerical_gradient(loss_of(e), [np.array([original[0, 1]])], 0)[0] ** 2 for e in exs[:4])
    w.data = original
    np.testing.assert_allclose(ours[0][0, 1], fd, rtol=1e-5)


def test_calibrate_keeps_the_global_top_k_of_the_fisher_scores():
    config = FishMaskConfig(keep_ratio=0.05, num_samples=5, target_modules=TARGETS)
    peft_model = get_peft_model(tiny_model(0, dtype=np.float64, size=TINIER), config)
    exs = examples()
    peft_model.calibrate(batches_of(exs, 2))
    layers = sparse_layers(peft_model, "default")
    hand = hand_fisher(exs, [p for p, _ in layers], 5)
    flat = np.concatenate([h.reshape(-1) for h in hand])
    k = fishmask_count(tiny_model(0, size=TINIER), config)
    offsets = np.cumsum([0] + [h.size for h in hand])
    chosen = np.concatenate([layer.delta_indices["default"] + off for (_, layer), off in zip(layers, offsets)])
    assert len(chosen) == k == peft_model.get_nb_trainable_parameters()[0]
    assert set(chosen) == set(np.argsort(-flat, kind="stable")[:k])
    assert {layer.mask_source["default"] for _, layer in layers} == {"fisher"}


def test_top_k_breaks_ties_towards_the_lower_index():
    scores = [np.array([1.0, 3.0, 2.0]), np.array([[2.0, 2.0], [0.5, 3.0]])]
    assert fisher.top_k(scores, 3).tolist() == [1, 2, 6]  # 3, 3, then the first 2.0
    assert fisher.top_k(scores, 4).tolist() == [1, 2, 3, 6]


def train(peft_model, exs, tmp_path, steps=3, weight_decay=0.0):
    data = Dataset(exs, pad_id=0, seq_len=16)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=steps, batch_size=2, lr=1e-2, seq_len=16,
                             warmup_steps=0, weight_decay=weight_decay, progress=False)
    Trainer(peft_model, args, data).train()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_training_moves_exactly_the_k_chosen_entries_and_the_file_applied_to_the_base_is_the_model(
        tmp_path, weight_decay):
    config = FishMaskConfig(keep_ratio=0.02, num_samples=6, target_modules=TARGETS)
    exs = examples(length=9, vocab=96)
    peft_model = get_peft_model(tiny_model(0), config)
    train(peft_model, exs, tmp_path, weight_decay=weight_decay)  # the Trainer calibrates first
    k = fishmask_count(tiny_model(0), config)
    ids = token_ids()
    expected = logits(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path / "adapter")

    # apply the file by hand: W.flat[indices] += values
    base, tensors = tiny_model(0), read_safetensors(tmp_path / "adapter" / WEIGHTS_NAME)
    changed = 0
    for name, module in base.named_modules():
        key = f"{PREFIX}{name}.delta_indices"
        if key in tensors:
            flat = module.weight.data.reshape(-1)
            flat[tensors[key]] += tensors[f"{PREFIX}{name}.delta_values"]
    merged = get_peft_model(tiny_model(0), config).merge_and_unload()  # placeholder ΔW = 0: the base itself
    for (name, p), (_, q) in zip(base.named_parameters(), merged.named_parameters()):
        changed += int((p.data != q.data).sum())
    assert changed == k
    np.testing.assert_allclose(logits(base, ids), expected, rtol=1e-5, atol=1e-5)

    merged = peft_model.merge_and_unload()  # merge is the same update
    np.testing.assert_allclose(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)


def test_uncalibrated_adapter_is_the_identity_and_refuses_to_train():
    config = FishMaskConfig(keep_ratio=0.02, target_modules=TARGETS)
    peft_model = get_peft_model(tiny_model(0), config)
    np.testing.assert_array_equal(logits(peft_model, token_ids()), logits(tiny_model(0), token_ids()))
    with pytest.raises(ConfigError, match="calibrate"):
        peft_model.mask_gradients(0)


def test_a_loaded_adapter_keeps_its_mask_and_calibrate_leaves_it(tmp_path):
    config = FishMaskConfig(keep_ratio=0.02, num_samples=4, target_modules=TARGETS)
    exs = examples(length=9, vocab=96)
    peft_model = get_peft_model(tiny_model(0), config)
    peft_model.calibrate(batches_of(exs, 2))
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(0), tmp_path, is_trainable=True)
    masks = [layer.delta_indices["default"].copy() for _, layer in sparse_layers(loaded, "default")]
    loaded.calibrate(batches_of(examples(seed=9, length=9, vocab=96), 2))  # a no-op: the file chose the mask
    loaded.mask_gradients(0)  # allowed
    for m, (_, layer) in zip(masks, sparse_layers(loaded, "default")):
        np.testing.assert_array_equal(m, layer.delta_indices["default"])


class Killed(Exception):
    pass


def interrupted_and_resumed(make, data, tmp_path, steps=4, kill_at=2):
    """(a run of ``steps`` updates, the same run killed after checkpoint-``kill_at`` and resumed
    in a fresh model ``make(checkpoint folder)``; ``make(None)`` builds the fresh runs' models)."""
    from minipeft.train.checkpoint import find_latest_checkpoint  # noqa: PLC0415

    def args(out):
        return TrainingArguments(str(out), max_steps=steps, batch_size=2, lr=1e-2, seq_len=16, warmup_steps=0,
                                 save_every=kill_at, progress=False)

    straight = make(None)
    Trainer(straight, args(tmp_path / "a"), data).train()
    interrupted = make(None)

    def kill(step):
        if step == kill_at:
            raise Killed

    interrupted.on_step_end = kill
    with pytest.raises(Killed):
        Trainer(interrupted, args(tmp_path / "b"), data).train()
    resumed = make(find_latest_checkpoint(tmp_path / "b"))
    Trainer(resumed, args(tmp_path / "b"), data).train(resume=True)
    return straight, resumed


def test_resume_continues_with_the_checkpoint_mask(tmp_path):
    """A resumed run builds its adapter from the checkpoint's mask (mask_path; the CLI does it)."""
    config = FishMaskConfig(keep_ratio=0.02, num_samples=6, target_modules=TARGETS)
    data = Dataset(examples(length=9, vocab=96), pad_id=0, seq_len=16)

    def make(checkpoint):
        mask = None if checkpoint is None else str(checkpoint / "adapter" / WEIGHTS_NAME)
        return get_peft_model(tiny_model(0), config.replace(mask_path=mask))

    straight, resumed = interrupted_and_resumed(make, data, tmp_path)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


@pytest.mark.parametrize("field, value", [("keep_ratio", 0), ("keep_ratio", 1.5), ("num_samples", 0),
                                          ("mask_method", "expect"), ("mask_path", 3)])
def test_config_fields_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        FishMaskConfig(**{field: value})


def test_a_ratio_that_keeps_nothing_is_refused():
    with pytest.raises(ConfigError, match="keeps no entry"):
        get_peft_model(tiny_model(0), FishMaskConfig(keep_ratio=1e-6, target_modules=["q_proj"]))


def test_a_mask_file_of_another_size_is_refused(tmp_path):
    peft_model = get_peft_model(tiny_model(0), FishMaskConfig(keep_ratio=0.02, target_modules=TARGETS))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="keeps"):
        get_peft_model(tiny_model(0), FishMaskConfig(keep_ratio=0.03, target_modules=TARGETS,
                                                     mask_path=str(tmp_path / WEIGHTS_NAME)))


@pytest.mark.parametrize("method", ["fishmask", "child-d", "child-f"])
def test_cli_trains_calibrates_and_resumes(tmp_path, capsys, method):
    """``minipeft train --method ...`` on the bundled model: the Fisher pass reads --data, and --resume
    rebuilds the adapter on the checkpoint's mask (so its values fit)."""
    lines = (Path(__file__).resolve().parents[3] / "examples" / "data" / "zoe_stories.jsonl").read_text().splitlines()
    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text("\n".join(lines[:12]) + "\n")
    common = ["train", "--data", str(data), "--out", str(out), "--method", method, "--steps", "2", "--batch-size", "4",
              "--seq-len", "64", "--save-every", "1", "--eval-every", "2", "--warmup", "0", "--schedule", "constant",
              "--fisher-samples", "5", "--keep-ratio", "0.01", "--reserve-p", "0.2"]
    assert main(common) == 0
    shutil.rmtree(out / "checkpoint-2")
    (out / "latest").write_text("checkpoint-1\n")
    assert main(common + ["--resume"]) == 0, capsys.readouterr().err
    loaded = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(Path(mp.__file__).parent / "data" /
                                                                           "stories260K"), out)
    assert loaded.peft_config["default"].mask_path is None
