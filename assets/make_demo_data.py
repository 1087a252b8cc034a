"""Generate Tunewise's bundled demo datasets, deterministically and offline.

The demo model (see `build_demo_model.py`) is pretrained on an encyclopedia of
invented places, rivers, people and animals, so its "original knowledge" is
text nobody else has and that we may ship. Fine-tuning then teaches it a task
that looks nothing like that text (writing ISO dates in words), and the
forgetting monitor measures how much of the encyclopedia it loses.

Files written (all byte-identical on every run; `python assets/make_demo_data.py`):

- `demo_pretrain.txt`: the pretraining corpus, one paragraph per line, several
  paragraphs per entity, each stating its facts in freshly drawn wording.
- `demo_original.jsonl`: `{"text": ...}` held-out paragraphs about the same
  entities and facts, never identical to a corpus line (forgetting monitor).
- `demo_sft.jsonl`: `{"messages": [user, assistant]}` date-rewriting chats.
- `demo_preference.jsonl`: `{"prompt", "chosen", "rejected"}` for the same task;
  `prompt` is the plain user request (wrap it in the chat template, see DEMO.md);
  `rejected` is plausibly wrong (wrong day / month / year, wrong format, rambling).

Everything comes from one seeded `random.Random` per file, so the files depend
only on this script.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

SEED = 1234
N_TOWNS = 110
N_RIVERS = 40
N_PEOPLE = 100
N_ANIMALS = 50
PARAGRAPHS_PER_ENTITY = 12
N_ORIGINAL = 400
N_SFT = 2000
N_PREFERENCE = 1000

MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")
DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r",
          "s", "st", "t", "th", "v", "w", "z", "sk", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "rk", "lm", "st", "x")
TOWN_ENDINGS = ("holt", "wick", "mere", "stad", "burg", "ford", "haven", "dal", "by", "port")

COUNTRIES = ("Orlavia", "Kestmark", "Thuland", "Brennoch", "Valdoria", "Istrel")
SEAS = ("the Grey Sea", "the Amber Sea", "the Northern Gulf", "the Bay of Quell", "the Silver Strait")
MOUNTAINS = ("the Harrow Mountains", "the Teller Hills", "the Ossian Range", "the Blue Fells")
PRODUCTS = ("glass bells", "copper kettles", "woollen blankets", "blue cheese", "paper lanterns",
            "clockwork toys", "salted herring", "rope bridges", "stone lions", "apple brandy",
            "silk ribbons", "honey cakes", "wooden boats", "painted tiles", "iron nails",
            "felt hats", "smoked eels", "violins", "barley beer", "leather boots")
PROFESSIONS = ("painter", "astronomer", "engineer", "poet", "botanist", "composer", "cartographer",
               "physician", "architect", "sculptor", "chemist", "explorer")
ACHIEVEMENTS = ("a map of the northern coast", "the first glass telescope in the region",
                "a book of river songs", "a bridge that still stands", "a cure for marsh fever",
                "a catalogue of mountain flowers", "the great tower clock", "a symphony in four parts",
                "a new kind of windmill", "a study of comets", "a statue of a sleeping giant",
                "a method for dyeing wool red")
COLOURS = ("grey", "brown", "red", "black", "white", "golden", "spotted", "striped", "blue", "green")
HABITATS = ("marshes", "pine forests", "sand dunes", "mountain lakes", "river banks", "grasslands",
            "sea cliffs", "caves")
DIETS = ("insects", "berries", "small fish", "seeds", "roots", "snails", "mice", "leaves")
KINDS = ("bird", "lizard", "beetle", "deer", "fox", "frog", "moth", "hare", "owl", "seal")


def make_name(rng: random.Random, syllables: int) -> str:
    """An invented, pronounceable word such as 'Varnholt' or 'Drelith'."""
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
    return word.capitalize()


def unique_names(rng: random.Random, count: int, make, taken: set[str]) -> list[str]:
    """`count` names from `make(rng)` that collide with nothing in `taken` (which is updated)."""
    names = []
    while len(names) < count:
        name = make(rng)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def with_article(noun_phrase: str) -> str:
    """'astronomer' -> 'an astronomer', 'painter' -> 'a painter'."""
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def thousands(number: int) -> str:
    """4200 -> '4,200' (the encyclopedia's style)."""
    return f"{number:,}"


@dataclass(frozen=True)
class Town:
    name: str
    """The town's invented name."""
    country: str
    """The invented country it lies in."""
    river: str
    """The river it lies on."""
    inhabitants: int
    """Population."""
    product: str
    """What it is known for."""
    founded: int
    """Year of founding."""


@dataclass(frozen=True)
class River:
    name: str
    """The river's invented name."""
    length_km: int
    """Length in kilometres."""
    source: str
    """The mountains where it rises."""
    mouth: str
    """The sea it flows into."""


@dataclass(frozen=True)
class Person:
    name: str
    """First and last name."""
    profession: str
    """What they did."""
    hometown: str
    """The town they were born in."""
    born: int
    """Year of birth."""
    achievement: str
    """What they are remembered for."""


@dataclass(frozen=True)
class Animal:
    name: str
    """The species' invented name, e.g. 'the Drelith fox'."""
    kind: str
    """Bird, lizard, ..."""
    colour: str
    """Colour of its coat, feathers or scales."""
    habitat: str
    """Where it lives."""
    diet: str
    """What it eats."""
    country: str
    """The country where it is found."""


def make_world(rng: random.Random) -> tuple[list[Town], list[River], list[Person], list[Animal]]:
    """Draw every invented entity and its facts."""
    taken: set[str] = set()
    river_names = unique_names(rng, N_RIVERS, lambda r: make_name(r, 1), taken)
    rivers = [River(name, rng.randrange(40, 900), rng.choice(MOUNTAINS), rng.choice(SEAS))
              for name in river_names]
    town_names = unique_names(rng, N_TOWNS, lambda r: make_name(r, 1) + r.choice(TOWN_ENDINGS), taken)
    towns = [Town(name, rng.choice(COUNTRIES), rng.choice(rivers).name,
                  rng.randrange(3, 900) * 100, rng.choice(PRODUCTS), rng.randrange(900, 1800))
             for name in town_names]
    first_names = unique_names(rng, N_PEOPLE, lambda r: make_name(r, 2), taken)
    last_names = unique_names(rng, N_PEOPLE, lambda r: make_name(r, 2), taken)
    people = [Person(f"{first} {last}", rng.choice(PROFESSIONS), rng.choice(towns).name,
                     rng.randrange(1600, 1950), rng.choice(ACHIEVEMENTS))
              for first, last in zip(first_names, last_names)]
    animal_names = unique_names(rng, N_ANIMALS, lambda r: make_name(r, 2), taken)
    animals = [Animal(f"the {name} {rng.choice(KINDS)}", "", rng.choice(COLOURS), rng.choice(HABITATS),
                      rng.choice(DIETS), rng.choice(COUNTRIES))
               for name in animal_names]
    # The kind is the last word of the name; store it for the sentences that use it.
    animals = [Animal(a.name, a.name.rsplit(" ", 1)[1], a.colour, a.habitat, a.diet, a.country)
               for a in animals]
    return towns, rivers, people, animals


def town_sentences(rng: random.Random, t: Town) -> list[str]:
    """One sentence per fact about a town, each in a randomly chosen wording."""
    n = thousands(t.inhabitants)
    return [
        rng.choice((f"{t.name} is a town on the river {t.river}.",
                    f"{t.name} lies on the river {t.river}.",
                    f"The town of {t.name} stands on the banks of the {t.river}.")),
        rng.choice((f"It has {n} inhabitants.", f"About {n} people live in {t.name}.",
                    f"The town has a population of {n}.")),
        rng.choice((f"It is known for its {t.product}.", f"{t.name} is famous for its {t.product}.",
                    f"The {t.product} of {t.name} are sold across {t.country}.")),
        rng.choice((f"{t.name} is in {t.country}.", f"It is a town in {t.country}.",
                    f"{t.name} belongs to {t.country}.")),
        rng.choice((f"It was founded in {t.founded}.", f"{t.name} was founded in {t.founded}.",
                    f"The town dates from {t.founded}.")),
    ]


def river_sentences(rng: random.Random, r: River) -> list[str]:
    """One sentence per fact about a river."""
    return [
        rng.choice((f"The {r.name} is a river {r.length_km} kilometres long.",
                    f"The river {r.name} is {r.length_km} kilometres long.",
                    f"The {r.name} runs for {r.length_km} kilometres.")),
        rng.choice((f"It rises in {r.source}.", f"The {r.name} rises in {r.source}.",
                    f"Its source is in {r.source}.")),
        rng.choice((f"It flows into {r.mouth}.", f"The {r.name} empties into {r.mouth}.",
                    f"Its mouth is on {r.mouth}.")),
    ]


def person_sentences(rng: random.Random, p: Person) -> list[str]:
    """One sentence per fact about a person."""
    last = p.name.split(" ")[1]
    return [
        rng.choice((f"{p.name} was {with_article(p.profession)} born in {p.hometown} in {p.born}.",
                    f"{p.name} was born in {p.hometown} in {p.born} and became {with_article(p.profession)}.",
                    f"The {p.profession} {p.name} was born in {p.born} in {p.hometown}.")),
        rng.choice((f"{last} is remembered for {p.achievement}.",
                    f"{p.name} is best known for {p.achievement}.",
                    f"Among the work of {last} is {p.achievement}.")),
    ]


def animal_sentences(rng: random.Random, a: Animal) -> list[str]:
    """One sentence per fact about an animal."""
    name = a.name[0].upper() + a.name[1:]
    return [
        rng.choice((f"{name} is a {a.colour} {a.kind} found in {a.country}.",
                    f"{name} is {with_article(a.kind)} of {a.country}. It is {a.colour}.",
                    f"In {a.country} lives {a.name}, a {a.colour} {a.kind}.")),
        rng.choice((f"It lives in {a.habitat} and eats {a.diet}.",
                    f"{name} makes its home in {a.habitat}. It feeds on {a.diet}.",
                    f"Its habitat is {a.habitat}, and its food is mostly {a.diet}.")),
    ]


def paragraph(rng: random.Random, sentences: list[str]) -> str:
    """Keep the first sentence first (it names the entity), shuffle the rest."""
    rest = sentences[1:]
    rng.shuffle(rest)
    return " ".join([sentences[0]] + rest)


def encyclopedia_with_entities(seed: int) -> tuple[list[str], list[tuple[str, object]]]:
    """(pretraining paragraphs, [(held-out paragraph, the entity it describes)])."""
    rng = random.Random(seed)
    towns, rivers, people, animals = make_world(rng)
    writers = ([(town_sentences, t) for t in towns] + [(river_sentences, r) for r in rivers]
               + [(person_sentences, p) for p in people] + [(animal_sentences, a) for a in animals])
    corpus: list[str] = []
    for write, entity in writers:
        for _ in range(PARAGRAPHS_PER_ENTITY):
            corpus.append(paragraph(rng, write(rng, entity)))
    rng.shuffle(corpus)
    seen = set(corpus)
    held_out: list[tuple[str, object]] = []
    held_out_rng = random.Random(seed + 1)
    while len(held_out) < N_ORIGINAL:
        write, entity = held_out_rng.choice(writers)
        text = paragraph(held_out_rng, write(held_out_rng, entity))
        if text not in seen:
            seen.add(text)
            held_out.append((text, entity))
    return corpus, held_out


def encyclopedia(seed: int) -> tuple[list[str], list[str]]:
    """(pretraining paragraphs, held-out paragraphs about the same entities)."""
    corpus, held_out = encyclopedia_with_entities(seed)
    return corpus, [text for text, _ in held_out]


#: The fact a knowledge probe falsifies for each kind of entity, and the pool of false values.
PROBED_FACTS = {Town: ("product", PRODUCTS), River: ("mouth", SEAS),
                Person: ("achievement", ACHIEVEMENTS), Animal: ("habitat", HABITATS)}


def fact_probes(count: int = 200, seed: int = SEED) -> list[tuple[str, str]]:
    """Pairs (held-out paragraph, the same paragraph with one fact made false).

    The first `count` rows of demo_original.jsonl, each with its town's product,
    river's mouth, person's achievement or animal's habitat swapped for another
    value of the same kind. A model that learned the facts (rather than only the
    style) gives the true paragraph the higher likelihood; chance is 50%.
    """
    _, held_out = encyclopedia_with_entities(seed)
    rng = random.Random(seed + 4)
    probes = []
    for text, entity in held_out[:count]:
        field, pool = PROBED_FACTS[type(entity)]
        true_value = getattr(entity, field)
        false_value = rng.choice([value for value in pool if value != true_value])
        probes.append((text, text.replace(true_value, false_value)))
    return probes


DATE_PROMPTS = (
    "Write the date {iso} in words.",
    "Rewrite {iso} as a date in words.",
    "What date is {iso}? Answer in words.",
    "Convert {iso} to day, month and year.",
    "Please spell out the date {iso}.",
)


def random_date(rng: random.Random) -> tuple[int, int, int]:
    """(year, month, day) with 1950 <= year < 2050; no 29 February, to keep the task simple."""
    month = rng.randrange(1, 13)
    return rng.randrange(1950, 2050), month, rng.randrange(1, DAYS_IN_MONTH[month - 1] + 1)


def iso(year: int, month: int, day: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}"


def in_words(year: int, month: int, day: int) -> str:
    """The task's answer: (2023, 4, 5) -> '5 April 2023'."""
    return f"{day} {MONTHS[month - 1]} {year}"


def date_prompt(rng: random.Random, date: tuple[int, int, int]) -> str:
    return rng.choice(DATE_PROMPTS).format(iso=iso(*date))


def sft_rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(N_SFT):
        date = random_date(rng)
        rows.append({"messages": [{"role": "user", "content": date_prompt(rng, date)},
                                  {"role": "assistant", "content": in_words(*date)}]})
    return rows


def wrong_answer(rng: random.Random, year: int, month: int, day: int) -> str:
    """A plausibly wrong answer: a wrong number, day and month swapped, a wrong format, or rambling."""
    kind = rng.choice(("day", "month", "year", "swap", "format", "ramble"))
    if kind == "day":
        wrong_day = day + rng.choice((-2, -1, 1, 2))
        wrong_day = wrong_day if 1 <= wrong_day <= 28 else (day % 28) + 1
        return in_words(year, month, wrong_day if wrong_day != day else day % 28 + 1)
    if kind == "month":
        return in_words(year, (month + rng.randrange(1, 12) - 1) % 12 + 1, day)
    if kind == "year":
        return in_words(year + rng.choice((-10, -1, 1, 10)), month, day)
    if kind == "swap" and day <= 12 and day != month:
        return in_words(year, day, month)
    if kind in ("swap", "format"):
        return rng.choice((f"{day:02d}/{month:02d}/{year}", f"{MONTHS[month - 1]} {day}, {year}",
                           f"{year}/{month:02d}/{day:02d}", iso(year, month, day)))
    answer = in_words(year, month, day)
    return rng.choice((f"The date is a date. The date is {answer}, which is the date {answer}.",
                       f"{answer} {MONTHS[month - 1]} {MONTHS[month - 1]} {year} {year}",
                       f"Well, it is a day in a month of a year, and the day is {day} and it is {answer}."))


def preference_rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(N_PREFERENCE):
        date = random_date(rng)
        rows.append({"prompt": date_prompt(rng, date), "chosen": in_words(*date),
                     "rejected": wrong_answer(rng, *date)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Write every demo file into `out_dir`; returns {short name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus, held_out = encyclopedia(SEED)
    paths = {
        "demo-pretrain": out_dir / "demo_pretrain.txt",
        "demo-original": out_dir / "demo_original.jsonl",
        "demo-sft": out_dir / "demo_sft.jsonl",
        "demo-preference": out_dir / "demo_preference.jsonl",
    }
    with open(paths["demo-pretrain"], "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(corpus) + "\n")
    write_jsonl(paths["demo-original"], [{"text": text} for text in held_out])
    write_jsonl(paths["demo-sft"], sft_rows(SEED + 2))
    write_jsonl(paths["demo-preference"], preference_rows(SEED + 3))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: assets/data)")
    args = parser.parse_args()
    for name, path in generate(args.out).items():
        print(f"{name:16s} {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
