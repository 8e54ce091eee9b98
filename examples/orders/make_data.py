"""Write the worked example's data: an order-extraction task and an unrelated held-out task.

Everything is generated here from fixed word lists and a fixed seed (nothing is downloaded):

- train.jsonl / val.jsonl / test.jsonl: free-form order sentences ("Could you ship two green
  mugs to Lisbon? Needed by Friday.") to turn into one normalised record
  ("qty=2; item=mug; color=green; city=Lisbon; day=Friday"). Quantities come as digits or
  words, items in the plural, and eight sentence shapes, so the mapping is learnable but not
  a copy. The test sentences use shapes and city names held out of training.
- general.jsonl: capital-city questions, a task the base model partly knows and the adapter
  never sees, to measure forgetting.

    python examples/orders/make_data.py OUT_DIR
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

INSTRUCTION = "Extract the order as a record: qty, item, color, city and day."
ITEMS = ["mug", "lamp", "chair", "notebook", "kettle", "backpack", "towel", "candle", "pillow", "bottle",
         "jacket", "basket"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
TRAIN_CITIES = ["Oslo", "Lisbon", "Madrid", "Vienna", "Dublin", "Prague", "Warsaw", "Athens", "Berlin", "Rome",
                "Paris", "Zurich", "Helsinki", "Budapest"]
TEST_CITIES = ["Tallinn", "Porto", "Lyon", "Munich"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
SHAPES = [
    "Please send {qty} {color} {items} to {city} by {day}.",
    "I need {qty} {color} {items} delivered in {city} on {day}.",
    "Could you ship {qty} {items} in {color} to {city}? Needed by {day}.",
    "{day} delivery to {city}: {qty} {color} {items}.",
    "Order for {city}, {qty} {color} {items}, to arrive {day}.",
    "We would like {qty} {items}, color {color}, shipped to our {city} office before {day}.",
    "Hi! {qty} {color} {items} for the {city} store please, {day} at the latest.",
    "Deliver {qty} {items} ({color}) to {city} this {day}.",
]
TEST_SHAPES = [
    "Can we get {qty} {color} {items} sent over to {city} for {day}?",
    "Ship to {city}: {qty} x {color} {items}, due {day}.",
]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin", "Hungary": "Budapest", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "Turkey": "Ankara", "Peru": "Lima",
    "Chile": "Santiago", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Czech Republic": "Prague", "Cuba": "Havana", "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad",
    "Colombia": "Bogota", "Nigeria": "Abuja",
}


def plural(item: str) -> str:
    return item + ("es" if item.endswith(("ch", "sh", "x", "s")) else "s")


def order(rng: random.Random, shapes: list[str], cities: list[str]) -> dict:
    qty = rng.randint(2, 10)
    fields = dict(item=rng.choice(ITEMS), color=rng.choice(COLORS), city=rng.choice(cities), day=rng.choice(DAYS))
    said = NUMBER_WORDS[qty] if rng.random() < 0.4 else str(qty)
    sentence = rng.choice(shapes).format(qty=said, items=plural(fields["item"]), **fields)
    record = f"qty={qty}; item={fields['item']}; color={fields['color']}; city={fields['city']}; day={fields['day']}"
    return {"instruction": INSTRUCTION, "input": sentence, "output": record}


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(out: Path) -> None:
    rng = random.Random(1234)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.jsonl", [order(rng, SHAPES, TRAIN_CITIES) for _ in range(600)])
    write(out / "val.jsonl", [order(rng, SHAPES, TRAIN_CITIES) for _ in range(24)])
    write(out / "test.jsonl", [order(rng, SHAPES + TEST_SHAPES, TRAIN_CITIES + TEST_CITIES) for _ in range(60)])
    write(out / "general.jsonl", [{"instruction": "Answer with the city name only.",
                                   "input": f"What is the capital of {country}?", "output": city}
                                  for country, city in CAPITALS.items()])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/orders/data"))
