"""Distil the bundled story model into a 6x smaller one with the same tokenizer, on the CPU.

stories260K (5 layers, hidden 64, 260K parameters) writes stories from BOS; this script
samples some of them (temperature 1, so the student sees the teacher's distribution, not
only its favourite story) and trains a 2-layer, hidden-32 LLaMA (41K parameters) on them:
sequence-level knowledge distillation (Kim and Rush, 2016, arXiv:1606.07947), with the
ordinary next-token loss and the Trainer. The result is a Hugging Face folder (config,
weights, the teacher's tokenizer files), so it shares the bundled model's vocabulary and
can serve as a proxy-tuning expert / anti-expert (examples/proxy_tuning.py).

    python examples/distill_small.py [--out runs/small] [--stories 384] [--steps 450]

About 40 s on two idle CPU cores with the defaults (held-out loss on teacher samples:
teacher 1.32, student 3.00).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import minipeft as mp
from minipeft.train import Trainer, TrainingArguments, evaluate
from minipeft.train.data import Dataset, Example

STUDENT = dict(vocab_size=512, hidden_size=32, intermediate_size=86, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def teacher_samples(teacher, n: int, length: int, seed: int) -> list[np.ndarray]:
    """n stories from BOS at temperature 1, each cut after its first stop id (kept: the student
    learns where stories end)."""
    rows = []
    for start in range(0, n, 64):
        count = min(64, n - start)
        out = teacher.generate(np.ones((count, 1), dtype=np.int64), max_new_tokens=length - 1,
                               temperature=1.0, seed=seed + start)
        for row in out:
            stops = np.flatnonzero(np.isin(row[1:], (1, 2)))
            rows.append(row[:stops[0] + 2] if len(stops) else row)
    return rows


def distill(out, stories: int = 384, steps: int = 450, length: int = 160, seed: int = 0) -> Path:
    """Sample, train, and save the student to ``out``; returns the folder."""
    path = Path(mp.bundled_model_path())
    teacher = mp.LlamaForCausalLM.from_pretrained(path)
    start = time.perf_counter()
    rows = teacher_samples(teacher, stories, length, seed)
    examples = [Example(r, r.copy(), f"teacher sample {i}") for i, r in enumerate(rows)]
    train, held = Dataset(examples[16:], 0, length, "teacher samples"), Dataset(examples[:16], 0, length, "held out")
    print(f"sampled {len(rows)} stories ({sum(map(len, rows))} tokens) from the teacher "
          f"in {time.perf_counter() - start:.0f} s")

    student = mp.LlamaForCausalLM(mp.LlamaConfig(**STUDENT), rng=np.random.default_rng(seed))
    student.generation_config = dict(teacher.generation_config)
    count = sum(p.size for p in student.parameters())
    print(f"student: {count:,} parameters (teacher {sum(p.size for p in teacher.parameters()):,}); "
          f"teacher loss on the held-out samples {evaluate(teacher, held)['eval_loss']:.3f}")
    run = Path(out).with_name(Path(out).name + "_run")
    shutil.rmtree(run, ignore_errors=True)
    args = TrainingArguments(output_dir=str(run), max_steps=steps, batch_size=16, lr=1e-2, warmup_steps=10,
                             schedule="cosine", seq_len=length, eval_every=steps, save_every=steps, seed=seed,
                             keep_checkpoints=1)
    start = time.perf_counter()
    Trainer(student, args, train, held).train()
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s; student loss on the held-out "
          f"samples {evaluate(student, held)['eval_loss']:.3f}")

    out = Path(out)
    student.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            shutil.copyfile(path / name, out / name)
    shutil.rmtree(run, ignore_errors=True)  # the checkpoints are not needed once the folder is written
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/small", help="the student's folder (written)")
    p.add_argument("--stories", type=int, default=384)
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = distill(args.out, args.stories, args.steps, seed=args.seed)
    tok = mp.Tokenizer.from_pretrained(out)
    small = mp.LlamaForCausalLM.from_pretrained(out)
    story = small.generate(np.array([[tok.bos_token_id]]), max_new_tokens=60, temperature=0.8, seed=0)
    print(f"saved to {out}; a sampled story: {tok.decode(story[0].tolist())}")


if __name__ == "__main__":
    main()
