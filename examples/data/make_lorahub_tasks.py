"""Make the LoRAHub demonstration's tasks (examples/lorahub_compose.py) from stories the
bundled model samples itself, as make_zoe_stories.py does (seeded, so rerunning it
rewrites the same files):

    lorahub_zoe.jsonl      heroine Lily -> Zoe          (stories with Lily, no park, no Tim)
    lorahub_max.jsonl      boy Tim -> Max               (stories with Tim, no Lily, no park)
    lorahub_beach.jsonl    the park -> the beach        (stories with a park, no Lily, no Tim)
    lorahub_zoe_beach_fewshot.jsonl / _eval.jsonl
                           held out: Zoe at the beach   (stories with Lily and a park, no Tim,
                           both renamed): 8 few-shot examples and 40 to evaluate on

The four groups are disjoint by construction. Run from the repository root:
``python examples/data/make_lorahub_tasks.py`` (a few minutes on a CPU).
"""
import json
import re
from pathlib import Path

import numpy as np

import minipeft as mp

HERE = Path(__file__).parent
TRAIN, FEWSHOT, EVAL = 150, 8, 40


def count(word, text):
    return len(re.findall(rf"\b{word}\b", text))


def task_of(text):
    """Which group a story belongs to (None: none), and the story rewritten for it."""
    lily, tim, park = count("Lily", text), count("Tim", text), count("park", text)
    if re.search(r"park", text, re.IGNORECASE) and park != len(re.findall("park", text, re.IGNORECASE)):
        return None, text  # "Park", "parks", "parked": keep the substitution unambiguous
    zoe = re.sub(r"\bLily\b", "Zoe", text)
    if lily >= 2 and not park and not tim:
        return "zoe", zoe
    if tim >= 2 and not lily and not park:
        return "max", re.sub(r"\bTim\b", "Max", text)
    if park >= 2 and not lily and not tim:
        return "beach", re.sub(r"\bpark\b", "beach", text)
    if lily >= 1 and park >= 1 and not tim:
        return "zoe_beach", re.sub(r"\bpark\b", "beach", zoe)
    return None, text


def main():
    path = mp.bundled_model_path()
    model, tok = mp.LlamaForCausalLM.from_pretrained(path), mp.Tokenizer.from_pretrained(path)
    rng = np.random.default_rng(2307)
    want = {"zoe": TRAIN, "max": TRAIN, "beach": TRAIN, "zoe_beach": FEWSHOT + EVAL}
    groups = {name: [] for name in want}
    for round_ in range(200):
        out = model.generate(np.ones((64, 1), dtype=np.int64), max_new_tokens=200, temperature=0.9,
                             top_p=0.95, seed=rng)
        for row in out:
            text = tok.decode(row.tolist()).strip()
            text = text[:max(text.rfind("."), text.rfind("!")) + 1]  # end on a full sentence
            name, story = task_of(text)
            if name and len(text) > 200 and len(groups[name]) < want[name]:
                groups[name].append(story)
        print(round_, {k: len(v) for k, v in groups.items()}, flush=True)
        if all(len(groups[k]) >= n for k, n in want.items()):
            break
    files = {"lorahub_zoe.jsonl": groups["zoe"], "lorahub_max.jsonl": groups["max"],
             "lorahub_beach.jsonl": groups["beach"],
             "lorahub_zoe_beach_fewshot.jsonl": groups["zoe_beach"][:FEWSHOT],
             "lorahub_zoe_beach_eval.jsonl": groups["zoe_beach"][FEWSHOT:]}
    for name, stories in files.items():
        (HERE / name).write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
        print(f"{name}: {len(stories)} stories")


if __name__ == "__main__":
    main()
