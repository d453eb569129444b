"""Write the small labelled data sets of `examples/train-demo.toml` into examples/data/.

Everything is generated from fixed seeds and word lists in this file (no downloads); the
outputs are committed, and running this again rewrites them byte for byte:

    python examples/make_data.py

- arithmetic.jsonl / arithmetic-eval.jsonl: {"a", "b", "sum"}: two numbers 0..49 and their
  sum (eval: pairs never seen in training).
- sentiment.csv: text,label: a short review built from one polarity's words; label
  "positive" or "negative".
- parity.jsonl: {"bits", "parity"}: 4..10 random bits; "even" or "odd" number of ones.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "data"

NOUNS = ["film", "meal", "hotel", "book", "concert", "phone", "game", "class", "trip", "show"]
GOOD = ["wonderful", "delightful", "superb", "charming", "excellent", "lovely", "brilliant",
        "pleasant", "great", "moving"]
BAD = ["dreadful", "boring", "awful", "clumsy", "terrible", "dull", "painful", "tedious",
       "poor", "bland"]
FRAMES = ["the {n} was {a}", "a {a} {n}, truly {b}", "honestly the {n} felt {a} and {b}",
          "what a {a} {n}", "i found the {n} {a}", "the whole {n} was {a}, just {b}"]


def arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(pairs)
    rows = [{"a": a, "b": b, "sum": a + b} for a, b in pairs]
    return rows[:600], rows[600:700]


def sentiment(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(400):
        positive = i % 2 == 0
        words = GOOD if positive else BAD
        a, b = rng.sample(words, 2)
        text = rng.choice(FRAMES).format(n=rng.choice(NOUNS), a=a, b=b)
        rows.append({"text": text, "label": "positive" if positive else "negative"})
    rng.shuffle(rows)
    return rows


def parity(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(400):
        bits = [rng.randint(0, 1) for _ in range(rng.randint(4, 10))]
        rows.append({"bits": " ".join(map(str, bits)), "parity": "odd" if sum(bits) % 2 else "even"})
    return rows


def main() -> None:
    HERE.mkdir(exist_ok=True)
    train, held_out = arithmetic(random.Random(1))
    for name, rows in (("arithmetic.jsonl", train), ("arithmetic-eval.jsonl", held_out),
                       ("parity.jsonl", parity(random.Random(3)))):
        with open(HERE / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(HERE / "sentiment.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(sentiment(random.Random(2)))


if __name__ == "__main__":
    main()
