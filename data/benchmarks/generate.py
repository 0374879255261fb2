"""Generate the bundled benchmark task `general_mc`: everyday general-knowledge questions, four choices
each, scored by lm-evaluation-harness on log-likelihood (no generation). It is a forgetting set, like
the canary rows of the eval data, but in a standard harness's format: what fine-tuning on Brightpaw's
support conversations must not erode. The script is seeded, so the same command always writes the same
bytes:

    python data/benchmarks/generate.py --seed 7

It writes `general_mc/general_mc.jsonl` (`question`, `choices`, `answer`: the right choice's index),
read by the task definition beside it, `general_mc/general_mc.yaml`. The questions are apart from the
eval set's canary questions and the general questions SFT trains on (`data/generate.py`).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import write_jsonl  # noqa: E402  (data/generate.py)

# (question, right answer, three wrong answers of the same kind)
QUESTIONS: list[tuple[str, str, list[str]]] = [
    # colours
    ("What color is a ripe strawberry?", "red", ["blue", "purple", "gray"]),
    ("What color are the leaves of most trees in summer?", "green", ["blue", "pink", "black"]),
    ("What color is coal?", "black", ["white", "yellow", "pink"]),
    ("What color is milk?", "white", ["green", "blue", "black"]),
    ("What color is a lemon?", "yellow", ["blue", "purple", "black"]),
    ("What color is an orange?", "orange", ["blue", "green", "white"]),
    ("What color do you get by mixing blue and yellow?", "green", ["red", "pink", "black"]),
    ("What color is a polar bear's fur?", "white", ["green", "blue", "red"]),
    # animals
    ("What animal says meow?", "a cat", ["a cow", "a horse", "a duck"]),
    ("What animal says quack?", "a duck", ["a dog", "a cat", "a cow"]),
    ("What animal has a very long neck?", "a giraffe", ["a pig", "a rabbit", "a mouse"]),
    ("Which animal has a trunk?", "an elephant", ["a dog", "a cat", "a snake"]),
    ("What animal is known as the king of the jungle?", "the lion", ["the mouse", "the frog", "the snail"]),
    ("What animal lays eggs and says cluck?", "a chicken", ["a cow", "a dog", "a horse"]),
    ("Which animal has black and white stripes?", "a zebra", ["a frog", "a pig", "a sheep"]),
    ("What do cows drink?", "water", ["oil", "paint", "sand"]),
    ("What is a baby cat called?", "a kitten", ["a puppy", "a calf", "a foal"]),
    ("What do spiders spin?", "webs", ["cars", "bricks", "clocks"]),
    ("Which animal hops and carries its baby in a pouch?", "a kangaroo", ["a cow", "a snake", "a fish"]),
    ("Where do penguins mostly live?", "Antarctica", ["the Sahara", "the Amazon", "Paris"]),
    # the body, food and everyday things
    ("How many fingers are on one human hand?", "five", ["two", "nine", "twelve"]),
    ("What do we use our eyes for?", "seeing", ["hearing", "smelling", "walking"]),
    ("What do we use our ears for?", "hearing", ["seeing", "tasting", "running"]),
    ("What organ pumps blood around the body?", "the heart", ["the nose", "the hair", "the teeth"]),
    ("What fruit do monkeys famously love?", "bananas", ["rocks", "nails", "soap"]),
    ("What is bread mainly made from?", "flour", ["glass", "stone", "plastic"]),
    ("What do you use to write on paper?", "a pen", ["a spoon", "a shoe", "a pillow"]),
    ("What do you wear on your feet?", "shoes", ["hats", "gloves", "scarves"]),
    (
        "Where do you keep food cold at home?",
        "in a refrigerator",
        ["in an oven", "in a bathtub", "in a closet"],
    ),
    ("What do you use to cut paper?", "scissors", ["a spoon", "a pillow", "a cup"]),
    # nature and science
    ("What falls from clouds when it rains?", "water", ["sand", "salt", "oil"]),
    ("What is the closest star to Earth?", "the Sun", ["the Moon", "Mars", "Venus"]),
    ("What do plants take in from the air to make food?", "carbon dioxide", ["gold", "salt", "sand"]),
    ("What is the hottest planet in our solar system?", "Venus", ["Neptune", "Uranus", "Pluto"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Neptune", "Saturn"]),
    ("What is the natural satellite of the Earth?", "the Moon", ["the Sun", "Jupiter", "Mars"]),
    ("Which season is the coldest?", "winter", ["summer", "spring", "autumn"]),
    ("What is the center of an atom called?", "the nucleus", ["the shell", "the skin", "the roof"]),
    # units and time
    ("How many seconds are in a minute?", "60", ["10", "100", "7"]),
    ("How many days are in a leap year?", "366", ["300", "100", "52"]),
    ("How many centimeters are in a meter?", "100", ["10", "12", "60"]),
    ("How many grams are in a kilogram?", "1000", ["10", "60", "12"]),
    ("How many weeks are in a year?", "52", ["12", "7", "100"]),
    ("How many hours are in two days?", "48", ["12", "30", "100"]),
    # geography
    ("What is the capital of the United Kingdom?", "London", ["Madrid", "Rome", "Tokyo"]),
    ("What is the capital of Russia?", "Moscow", ["Paris", "Lisbon", "Cairo"]),
    ("What is the capital of China?", "Beijing", ["Rome", "Oslo", "Lisbon"]),
    ("What is the capital of the United States?", "Washington, D.C.", ["London", "Madrid", "Berlin"]),
    ("What is the capital of Greece?", "Athens", ["Tokyo", "Oslo", "Cairo"]),
    ("What is the longest river in Africa?", "the Nile", ["the Thames", "the Seine", "the Danube"]),
    ("Which country is famous for the Eiffel Tower?", "France", ["Japan", "Brazil", "Canada"]),
    ("On which continent is Egypt?", "Africa", ["Europe", "Australia", "South America"]),
    ("Which country has the city of Rio de Janeiro?", "Brazil", ["Sweden", "Japan", "Egypt"]),
    ("What is the largest desert in Africa?", "the Sahara", ["the Arctic", "the Alps", "the Amazon"]),
    # arithmetic
    ("What is 1 + 1?", "2", ["5", "9", "7"]),
    ("What is 3 + 3?", "6", ["2", "9", "1"]),
    ("What is 10 + 10?", "20", ["5", "3", "90"]),
    ("What is 7 minus 2?", "5", ["9", "1", "12"]),
    ("What is 4 times 2?", "8", ["3", "1", "15"]),
    ("What is half of 10?", "5", ["2", "8", "20"]),
    ("What is 100 divided by 10?", "10", ["1", "90", "55"]),
    ("What number comes after 9?", "10", ["3", "7", "1"]),
]


def generate(seed: int = 7) -> list[dict]:
    """One row per question, the right answer at a seeded position among its choices."""
    rng = random.Random(seed)
    rows = []
    for question, right, wrong in QUESTIONS:
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(right)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "general_mc" / "general_mc.jsonl")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rows = generate(args.seed)
    write_jsonl(args.out, rows)
    print(f"general_mc: {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
