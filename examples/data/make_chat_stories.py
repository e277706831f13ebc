"""Turn the Zoe stories into chat data: {"messages": [system, user, assistant]} per line.

The user asks for a story about a thing the story mentions; the assistant answers with the
story's first sentences. Every line is rendered with the model's chat template at training
time and only the assistant's turn is learned (minipeft/train/data.py).
"""
import json
import re
from pathlib import Path

HERE = Path(__file__).parent
THINGS = ["park", "ball", "dog", "cat", "tree", "toy", "cake", "bird", "flower", "car", "boat", "pond",
          "garden", "mom", "friend", "box", "sun", "rain", "book", "doll"]
SYSTEM = "You tell short stories for children."


def first_sentences(text: str, n: int = 3) -> str:
    sentences = re.findall(r"[^.!?]*[.!?]", text.replace("\n", " "))
    return " ".join(s.strip() for s in sentences[:n])


def main() -> None:
    records = []
    for line in (HERE / "zoe_stories.jsonl").read_text().splitlines():
        answer = first_sentences(json.loads(line)["text"])
        words = set(re.findall(r"[a-z]+", answer.lower()))
        thing = next((t for t in THINGS if t in words), None)  # a thing the answer itself mentions
        if thing is None:
            continue
        records.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Tell me a story about Zoe and the {thing}."},
            {"role": "assistant", "content": answer},
        ]})
    with open(HERE / "chat_stories.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(len(records), "conversations")


if __name__ == "__main__":
    main()
