"""Sample stories from the bundled model and rename the heroine Lily -> Zoe."""
import json, numpy as np, minipeft as mp
path = mp.bundled_model_path()
model = mp.LlamaForCausalLM.from_pretrained(path)
tok = mp.Tokenizer.from_pretrained(path)
rng = np.random.default_rng(1234)
stories = []
batch = 16
for round_ in range(40):
    prompts = np.ones((batch, 1), dtype=np.int64)
    out = model.generate(prompts, max_new_tokens=200, temperature=0.9, top_p=0.95, seed=rng)
    for row in out:
        text = tok.decode(row.tolist()).strip()
        cut = max(text.rfind("."), text.rfind("!"))
        text = text[: cut + 1]
        if text.count("Lily") >= 2 and len(text) > 200:
            stories.append(text.replace("Lily", "Zoe"))
    if len(stories) >= 240:
        break
print(len(stories))
with open("examples/data/zoe_stories.jsonl", "w") as f:
    for s in stories[:240]:
        f.write(json.dumps({"text": s}) + "\n")
