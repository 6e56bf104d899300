"""Write the bundled example datasets, deterministically (same bytes on every run).

    .venv/bin/python examples/make_datasets.py            # (re)write the files
    .venv/bin/python examples/make_datasets.py --check    # exit 1 if a committed file differs

- ``json-extract/data.jsonl`` (chat, 300 rows): a fixed system prompt, a short sentence about a
  person, and the answer as compact JSON with a fixed key order, e.g.
  ``{"name": "Maria", "age": 34, "city": "Lisbon"}``. A few sentence templates carry a distractor
  (a former city, a second number), so copying the first city or number is wrong, and a quarter
  of the sentences leave out the age or the city, which is then ``null``.
- ``reply-style/data.jsonl`` (alpaca, 250 rows): short questions; every answer starts with
  ``Answer:`` and ends with a one-line summary ``In short: ...``.
- ``dpo/data.jsonl`` (preference, 60 rows): the same reply style is ``chosen``; a hedging,
  rambling answer with the same fact is ``rejected``.

All people, places and numbers are made up or public facts; there is no personal data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "Extract the person's name, age and city as JSON."

NAMES = (
    "Maria João Aisha Kenji Olga Pierre Ana Lars Priya Mateo Fatima Chen Ingrid Tomás Yusuf "
    "Sofia Dmitri Amara Hugo Leila Noah Zara Emil Nadia Rafael Hana Omar Clara Ivan Mei Diego "
    "Greta Kofi Elena Ravi Freya Luca Sana Felix Inês Jonas Aylin Marco Yara Oskar Lina Tariq "
    "Elif Bruno Nora Samir Julia Arjun Maja Pablo Keiko Anton Rosa Idris Vera"
).split()
CITIES = (
    "Lisbon|Porto|Madrid|Berlin|Oslo|Kyoto|Nairobi|Lima|Dublin|Krakow|Austin|Cairo|Seoul|Quito|"
    "Lyon|Turin|Hanoi|Perth|Bergen|Leeds|Accra|Tunis|Riga|Graz|Malmö|Bogotá|Osaka|Zagreb|Lagos|"
    "Denver|Hamburg|Seville|Gdansk|Helsinki|Montreal|Dakar|Vienna|Prague|Athens|Bristol|"
    "Buenos Aires|Cape Town|New York|São Paulo|Mexico City|Hong Kong|Rio de Janeiro|Tel Aviv|"
    "Kuala Lumpur|San Diego"
).split("|")

# Sentence templates; some carry a distractor (a former city, a second number) and the last four
# leave out the age or the city, whose value is then null.
TEMPLATES: tuple[Callable[[dict], str], ...] = (
    lambda p: f"{p['name']} is {p['age']} and lives in {p['city']}.",
    lambda p: f"{p['name']}, {p['age']}, lives in {p['city']}.",
    lambda p: f"At {p['age']}, {p['name']} calls {p['city']} home.",
    lambda p: f"{p['city']} is where {p['name']}, aged {p['age']}, lives.",
    lambda p: f"Meet {p['name']}: {p['age']} years old and based in {p['city']}.",
    lambda p: f"{p['name']} is a {p['age']}-year-old from {p['city']}.",
    lambda p: f"{p['name']} ({p['age']}) moved from {p['other_city']} to {p['city']} last year.",
    lambda p: f"Born in {p['other_city']}, {p['name']} now lives in {p['city']} and is {p['age']}.",
    lambda p: f"{p['name']}, who has {p['count']} cats, is {p['age']} and lives in {p['city']}.",
    lambda p: f"After {p['count']} years in {p['city']}, {p['name']} is now {p['age']}.",
    lambda p: f"Age {p['age']}, city {p['city']}, name {p['name']}.",
    lambda p: (
        f"{p['name']} left {p['other_city']} at {p['count']} and lives in {p['city']}, "
        f"aged {p['age']}."
    ),
    lambda p: f"{p['name']} is {p['age']}.",
    lambda p: f"{p['name']} turned {p['age']} last week and has {p['count']} cats.",
    lambda p: f"{p['name']} lives in {p['city']}.",
    lambda p: f"{p['name']} moved from {p['other_city']} to {p['city']}.",
)
NO_CITY = {12, 13}
NO_AGE = {14, 15}


def _line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def json_extract(rows: int = 300, seed: int = 3) -> str:
    """Chat rows: sentence about a person -> ``{"name", "age", "city"}`` JSON."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < rows:
        template = len(out) % len(TEMPLATES)
        age = rng.randint(18, 89)
        person = {
            "name": rng.choice(NAMES),
            "age": age,
            "city": rng.choice(CITIES),
            "other_city": rng.choice(CITIES),
            "count": rng.randint(2, min(age - 1, 15)),
        }
        sentence = TEMPLATES[template](person)
        if person["other_city"] == person["city"] or sentence in seen:
            continue
        seen.add(sentence)
        answer = {
            "name": person["name"],
            "age": None if template in NO_AGE else person["age"],
            "city": None if template in NO_CITY else person["city"],
        }
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
        ]
        out.append(_line({"messages": messages}))
    rng.shuffle(out)
    return "".join(out)


CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Australia": "Canberra",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Hungary": "Budapest",
    "the Czech Republic": "Prague",
    "Belgium": "Brussels",
    "the Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Colombia": "Bogotá",
    "Cuba": "Havana",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "Iceland": "Reykjavik",
    "Brazil": "Brasília",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "early": "late",
    "light": "dark",
    "happy": "sad",
    "open": "closed",
    "full": "empty",
    "old": "young",
    "strong": "weak",
    "high": "low",
    "wet": "dry",
    "loud": "quiet",
    "rich": "poor",
    "thick": "thin",
    "hard": "soft",
    "clean": "dirty",
    "easy": "difficult",
    "near": "far",
    "cheap": "expensive",
    "long": "short",
    "heavy": "light",
    "true": "false",
    "up": "down",
    "inside": "outside",
    "before": "after",
    "win": "lose",
    "buy": "sell",
    "push": "pull",
    "begin": "end",
}
PLURALS = {
    "mouse": "mice",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "man": "men",
    "woman": "women",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "box": "boxes",
    "city": "cities",
    "baby": "babies",
    "bus": "buses",
    "potato": "potatoes",
    "hero": "heroes",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "cactus": "cacti",
    "crisis": "crises",
    "ox": "oxen",
    "life": "lives",
    "half": "halves",
    "church": "churches",
    "fox": "foxes",
    "lady": "ladies",
    "shelf": "shelves",
    "wife": "wives",
}
YOUNG = {
    "cat": "kitten",
    "dog": "puppy",
    "cow": "calf",
    "horse": "foal",
    "sheep": "lamb",
    "goat": "kid",
    "duck": "duckling",
    "goose": "gosling",
    "frog": "tadpole",
    "bear": "cub",
    "lion": "cub",
    "kangaroo": "joey",
    "swan": "cygnet",
    "owl": "owlet",
    "pig": "piglet",
    "deer": "fawn",
    "eagle": "eaglet",
    "hen": "chick",
    "whale": "calf",
    "seal": "pup",
}
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
UNITS = (  # (big unit, small unit, factor)
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilometres", "metres", 1000),
    ("days", "hours", 24),
    ("litres", "millilitres", 1000),
    ("weeks", "days", 7),
)
SENTENCES = (
    "The cat sat on the mat.",
    "We walked to the station in the rain.",
    "She reads a book every week.",
    "The old bridge was closed for repairs.",
    "Bright stars filled the quiet night sky.",
    "He forgot his umbrella again.",
    "The bakery opens at seven.",
    "Our team won the final match.",
    "Fresh bread smells wonderful.",
    "They planted three trees in the garden.",
)
WORDS = "lamp river garden pencil window orange silver rocket planet candle".split()


def _styled(sentence: str, short: str) -> str:
    return f"Answer: {sentence}\nIn short: {short}."


def _qa_pairs(rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(instruction, input, answer sentence, short) for the reply-style set."""
    pairs = []
    for country, city in CAPITALS.items():
        pairs.append(
            (f"What is the capital of {country}?", "", f"The capital of {country} is {city}.", city)
        )
    for word, opposite in OPPOSITES.items():
        pairs.append(
            (
                f"What is the opposite of '{word}'?",
                "",
                f"The opposite of '{word}' is '{opposite}'.",
                opposite,
            )
        )
    for word, plural in PLURALS.items():
        pairs.append(
            (
                f"What is the plural of '{word}'?",
                "",
                f"The plural of '{word}' is '{plural}'.",
                plural,
            )
        )
    for animal, young in YOUNG.items():
        pairs.append(
            (
                f"What is a young {animal} called?",
                "",
                f"A young {animal} is called a {young}.",
                young,
            )
        )
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        pairs.append((f"Which day comes after {day}?", "", f"The day after {day} is {nxt}.", nxt))
    for i, month in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        pairs.append(
            (f"Which month comes after {month}?", "", f"The month after {month} is {nxt}.", nxt)
        )
    seen = set()
    while len(seen) < 57:
        a, b, op = rng.randint(2, 60), rng.randint(2, 40), rng.choice(("plus", "minus", "times"))
        if (a, b, op) in seen or (op == "minus" and b > a):
            continue
        seen.add((a, b, op))
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        pairs.append((f"What is {a} {op} {b}?", "", f"{a} {op} {b} equals {value}.", str(value)))
    for big, small, factor in UNITS:
        for n in rng.sample(range(2, 13), 3):
            pairs.append(
                (
                    f"How many {small} are in {n} {big}?",
                    "",
                    f"There are {n * factor} {small} in {n} {big}.",
                    f"{n * factor} {small}",
                )
            )
    for sentence in SENTENCES:
        count = len(sentence.split())
        pairs.append(
            (
                "Count the words in the sentence.",
                sentence,
                f"The sentence has {count} words.",
                f"{count} words",
            )
        )
    for word in WORDS:
        pairs.append(
            (
                "Reverse the letters of the word.",
                word,
                f"'{word}' written backwards is '{word[::-1]}'.",
                word[::-1],
            )
        )
    for celsius in (0, 5, 10, 15, 20, 25, 30, 35, 40, 100):
        fahrenheit = celsius * 9 // 5 + 32
        pairs.append(
            (
                "Convert the temperature to Fahrenheit.",
                f"{celsius} °C",
                f"{celsius} °C is {fahrenheit} °F.",
                f"{fahrenheit} °F",
            )
        )
    return pairs


def reply_style(seed: int = 5) -> str:
    """Alpaca rows whose outputs follow the ``Answer: ... / In short: ...`` style."""
    rng = random.Random(seed)
    pairs = _qa_pairs(rng)
    rng.shuffle(pairs)
    return "".join(
        _line({"instruction": q, "input": extra, "output": _styled(sentence, short)})
        for q, extra, sentence, short in pairs
    )


HEDGES = (
    "Hmm, that's a really interesting question and there is a lot one could say about it. "
    "If I remember correctly, {s_lower} But please double-check, I might be wrong!",
    "Great question! So, basically, people often wonder about this. {s} I hope that helps, "
    "and let me know if you have any other questions at all!",
    "Well, it depends on how you look at it, honestly. Most sources would probably tell you "
    "that {s_lower} At least, that's what I think.",
    "Let me think about this step by step, because it's not always obvious. After some "
    "thought: {s_lower} Anyway, that's my best guess.",
)


def dpo(rows: int = 60, seed: int = 11) -> str:
    """Preference rows: the concise reply style is chosen over a hedging, rambling answer."""
    rng = random.Random(seed)
    pairs = [p for p in _qa_pairs(random.Random(5)) if not p[1]]
    picked = rng.sample(pairs, rows)
    out = []
    for index, (question, _, sentence, short) in enumerate(picked):
        lower = sentence[0].lower() + sentence[1:]
        rejected = HEDGES[index % len(HEDGES)].format(s=sentence, s_lower=lower)
        out.append(
            _line({"prompt": question, "chosen": _styled(sentence, short), "rejected": rejected})
        )
    return "".join(out)


DATASETS = {
    "json-extract/data.jsonl": json_extract,
    "reply-style/data.jsonl": reply_style,
    "dpo/data.jsonl": dpo,
}


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) every example dataset; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for relative, make in DATASETS.items():
        path = HERE / relative
        text = make()
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(relative)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)} ({text.count(chr(10))} rows)")
    if stale:
        print(f"stale: {', '.join(stale)} (run examples/make_datasets.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
