"""Instruction data of the family's three domains and the compositional set, generated offline.

Every record follows the family contract (``docs/family-format.md``): ``id``, ``domain``,
``instruction``, ``input``, ``output``, plus ``answer`` (maths) or ``context`` (SQL). All text
comes from ``random.Random`` streams seeded by the family seed, so the data is a pure function
of (seed, sizes). Held-out eval records never share their (instruction, input) with a train
record, and compositional problems are drawn apart from every maths problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dammerge.family.lang import (
    ADJECTIVES,
    LANGUAGE_NAME,
    MALE_NAMES,
    NAMES,
    NOUNS,
    VERBS,
    Veltic,
)

Record = dict[str, Any]

# --------------------------------------------------------------------------- Veltic tasks

TRANSITIVE = tuple(
    [
        "see",
        "find",
        "take",
        "have",
        "buy",
        "sell",
        "like",
        "love",
        "want",
        "help",
        "visit",
        "watch",
        "follow",
        "paint",
        "open",
        "close",
        "carry",
        "build",
        "write",
        "make",
        "hold",
        "bring",
        "catch",
        "clean",
        "climb",
        "share",
    ]
)
INTRANSITIVE = tuple(
    ["walk", "jump", "laugh", "rest", "run", "sleep", "sing", "swim", "dance", "play", "work"]
)
PLACES = tuple(
    [
        "river",
        "tree",
        "house",
        "garden",
        "road",
        "hill",
        "field",
        "forest",
        "lake",
        "bridge",
        "market",
        "shop",
    ]
)
PREPOSITIONS = ("in", "near", "under", "behind", "across", "on")
SUBJECT_PRONOUNS = {"he": "sg", "she": "sg", "they": "pl", "we": "pl", "I": "pl", "you": "pl"}
OBJECT_PRONOUNS = ("him", "her", "them", "us", "me")
PERSON_NOUNS = tuple(
    [
        "dog",
        "cat",
        "bird",
        "horse",
        "farmer",
        "teacher",
        "king",
        "queen",
        "boy",
        "girl",
        "friend",
        "child",
        "man",
        "woman",
        "fox",
        "sister",
        "brother",
        "mother",
        "father",
        "baker",
        "sailor",
    ]
)
THING_NOUNS = tuple(n for n in NOUNS if n not in PERSON_NOUNS and n not in ("end", "number"))


def _noun_phrase(rng: random.Random, nouns: tuple[str, ...], number: str) -> str:
    noun = rng.choice(nouns)
    word = NOUNS[noun] if number == "pl" else noun
    if rng.random() < 0.45:
        word = f"{rng.choice(ADJECTIVES[:-1])} {word}"
    determiners = ["the", "my", "his", "her", "their"]
    determiners += ["some"] if number == "pl" else ["this", "that", "every"]
    if number == "sg" and word[0] not in "aeiou":
        determiners.append("a")
    return f"{rng.choice(determiners)} {word}"


def _subject(rng: random.Random) -> tuple[str, str]:
    """A subject and its agreement number ('sg' takes the -s verb form in the present)."""
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(NAMES), "sg"
    if roll < 0.45:
        pronoun = rng.choice(list(SUBJECT_PRONOUNS))
        return pronoun, SUBJECT_PRONOUNS[pronoun]
    number = rng.choice(("sg", "pl"))
    return _noun_phrase(rng, PERSON_NOUNS, number), number


def _verb_form(lemma: str, tense: str, number: str) -> str:
    third, past = VERBS[lemma]
    if tense == "past":
        return past
    return third if number == "sg" else lemma


def english_sentence(rng: random.Random, tense: str) -> str:
    """One English sentence of the controlled vocabulary (subject, verb, object or place)."""
    subject, number = _subject(rng)
    if rng.random() < 0.65:
        lemma = rng.choice(TRANSITIVE)
        roll = rng.random()
        if roll < 0.15:
            obj = rng.choice(NAMES)
        elif roll < 0.25:
            obj = rng.choice(OBJECT_PRONOUNS)
        else:
            obj = _noun_phrase(rng, THING_NOUNS, rng.choice(("sg", "pl")))
        rest = [obj]
    else:
        lemma = rng.choice(INTRANSITIVE)
        rest = []
    if rng.random() < 0.5:
        rest.append(f"{rng.choice(PREPOSITIONS)} {_noun_phrase(rng, PLACES, 'sg')}")
    if rng.random() < 0.3:
        adverbs = ["quickly", "slowly", "again"]
        adverbs.append("yesterday" if tense == "past" else "often")
        rest.append(rng.choice(adverbs))
    words = [subject, _verb_form(lemma, tense, number), *rest]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _english_text(rng: random.Random, tense: str | None = None) -> str:
    count = rng.choice((1, 1, 2))
    return " ".join(
        english_sentence(rng, tense or rng.choice(("present", "past"))) for _ in range(count)
    )


def lang_record(rng: random.Random, veltic: Veltic) -> Record:
    """A translation (either direction) or a Veltic rewriting task."""
    roll = rng.random()
    if roll < 0.5:
        english = _english_text(rng)
        instruction = f"Translate the following English text into {LANGUAGE_NAME}."
        return {"instruction": instruction, "input": english, "output": veltic.translate(english)}
    if roll < 0.8:
        english = _english_text(rng)
        instruction = f"Translate the following {LANGUAGE_NAME} text into English."
        return {"instruction": instruction, "input": veltic.translate(english), "output": english}
    seed = rng.random()
    present = _english_text(random.Random(seed), "present")
    past = _english_text(random.Random(seed), "past")
    return {
        "instruction": f"Rewrite the following {LANGUAGE_NAME} text in the past tense.",
        "input": veltic.translate(present),
        "output": veltic.translate(past),
    }


# --------------------------------------------------------------------------- maths

MATH_INSTRUCTION = "Solve the problem. Give the answer at the end."
ITEMS = tuple(
    [
        "apples",
        "pencils",
        "books",
        "coins",
        "cookies",
        "stones",
        "cards",
        "eggs",
        "flowers",
        "cakes",
        "shells",
        "marbles",
        "stickers",
        "balls",
    ]
)
EDIBLE = frozenset({"apples", "cookies", "eggs", "cakes"})


@dataclass
class _Problem:
    """A word problem under construction: its sentences, worked equations and running total."""

    sentences: list[str]
    equations: list[str]
    total: int


def _pronouns(name: str) -> tuple[str, str]:
    return ("he", "him") if name in MALE_NAMES else ("she", "her")


def _start(rng: random.Random, name: str, items: str) -> _Problem:
    if rng.random() < 0.35:
        bags, each = rng.randint(2, 5), rng.randint(2, 9)
        total = bags * each
        sentence = f"{name} has {bags} bags with {each} {items} in each bag."
        return _Problem([sentence], [f"{bags} * {each} = {total}"], total)
    total = rng.randint(4, 30)
    return _Problem([f"{name} has {total} {items}."], [], total)


def _step(rng: random.Random, problem: _Problem, name: str, items: str, budget: int) -> None:
    """Append one operation to ``problem`` using at most ``budget`` equations.

    Adding a product ("buys 3 more bags with 4 in each bag") takes two equations.
    """
    he, him = _pronouns(name)
    friend = rng.choice([n for n in NAMES if n != name])
    subject = f"Then {he}" if rng.random() < 0.4 else he.capitalize()
    total = problem.total
    kinds = ["add", "add", "sub", "sub"] if total > 2 else ["add"]
    if budget >= 2:
        kinds.append("bags")
    kind = rng.choice(kinds)
    if kind == "bags":
        bags, each = rng.randint(2, 4), rng.randint(2, 6)
        extra = bags * each
        problem.sentences.append(
            f"{subject} buys {bags} more bags with {each} {items} in each bag."
        )
        problem.equations += [f"{bags} * {each} = {extra}", f"{total} + {extra} = {total + extra}"]
        problem.total = total + extra
    elif kind == "add":
        amount = rng.randint(2, 15)
        templates = [
            f"{subject} buys {amount} more {items}.",
            f"{subject} finds {amount} more {items}.",
        ]
        templates.append(f"{friend} gives {him} {amount} more {items}.")
        problem.sentences.append(rng.choice(templates))
        problem.equations.append(f"{total} + {amount} = {total + amount}")
        problem.total = total + amount
    else:
        amount = rng.randint(2, min(total - 1, 15))
        templates = [
            f"{subject} gives {amount} {items} to {friend}.",
            f"{subject} loses {amount} {items}.",
            f"{subject} sells {amount} {items}.",
        ]
        if items in EDIBLE:
            templates.append(f"{subject} eats {amount} {items}.")
        problem.sentences.append(rng.choice(templates))
        problem.equations.append(f"{total} - {amount} = {total - amount}")
        problem.total = total - amount


def _question(rng: random.Random, problem: _Problem, name: str, items: str) -> None:
    """The last operation and the question: share into boxes (divide), or one more step."""
    he, _ = _pronouns(name)
    divisors = [k for k in (2, 3, 4, 5) if problem.total % k == 0 and problem.total // k > 1]
    if divisors and rng.random() < 0.4:
        boxes = rng.choice(divisors)
        problem.sentences.append(
            f"{he.capitalize()} puts the {items} into {boxes} boxes with the same number in "
            f"each box. How many {items} are in each box?"
        )
        problem.equations.append(f"{problem.total} / {boxes} = {problem.total // boxes}")
        problem.total //= boxes
        return
    _step(rng, problem, name, items, budget=1)
    problem.sentences.append(f"How many {items} does {name} have now?")


def math_problem(rng: random.Random) -> tuple[str, str, int]:
    """(problem text, worked solution, answer) of a 2-3 step arithmetic word problem."""
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    problem = _start(rng, name, items)
    steps = rng.choice((2, 3))
    while len(problem.equations) < steps - 1:
        _step(rng, problem, name, items, budget=steps - 1 - len(problem.equations))
    _question(rng, problem, name, items)
    solution = " ".join(f"{eq}." for eq in problem.equations)
    solution += f" The answer is {problem.total}."
    return " ".join(problem.sentences), solution, problem.total


def math_record(rng: random.Random) -> Record:
    problem, solution, answer = math_problem(rng)
    return {
        "instruction": MATH_INSTRUCTION,
        "input": problem,
        "output": solution,
        "answer": str(answer),
    }


def compositional_record(rng: random.Random, veltic: Veltic) -> Record:
    """A maths problem posed in Veltic (instruction and problem translated; answer numeric)."""
    problem, solution, answer = math_problem(rng)
    return {
        "instruction": veltic.translate(MATH_INSTRUCTION),
        "input": veltic.translate(problem),
        "output": solution,
        "answer": str(answer),
        "english_input": problem,
    }


# --------------------------------------------------------------------------- SQL


@dataclass(frozen=True)
class Theme:
    """A kind of table: its label column, and pools for its text and numeric columns."""

    table: str
    label: str
    labels: tuple[str, ...]
    text: dict[str, tuple[str, ...]]
    numeric: dict[str, tuple[int, int]]


def _pool(words: str) -> tuple[str, ...]:
    return tuple(words.split())


PEOPLE = _pool(
    "alice bruno carla dmitri elena farid greta hugo irene jonas kira luis marta nadia oscar "
    "paula quinn rafael sofia tariq uma victor wendy xavier yara"
)
THEMES = (
    Theme(
        "employees",
        "name",
        PEOPLE,
        {
            "department": _pool("sales research support design finance"),
            "city": _pool("paris oslo lima cairo tokyo"),
        },
        {"salary": (30, 150), "age": (20, 65)},
    ),
    Theme(
        "products",
        "name",
        _pool("lamp chair desk kettle mirror blanket clock vase pillow basket shelf stool"),
        {
            "category": _pool("home office garden kitchen"),
            "color": _pool("red blue green black white"),
        },
        {"price": (5, 300), "stock": (0, 80)},
    ),
    Theme(
        "students",
        "name",
        PEOPLE,
        {"house": _pool("north south east west"), "club": _pool("chess music drama science art")},
        {"score": (40, 100), "age": (10, 18)},
    ),
    Theme(
        "cities",
        "name",
        _pool("alder brook cedar dune ember fjord grove harbor iris juniper kestrel linden marsh"),
        {"country": _pool("norland estria valmar corvia"), "climate": _pool("dry wet mild cold")},
        {"population": (10, 950), "area": (20, 900)},
    ),
    Theme(
        "books",
        "title",
        _pool(
            "atlas beacon cipher drift echo fable garnet harvest island journey keystone lantern"
        ),
        {
            "genre": _pool("mystery history poetry science travel"),
            "author": _pool("moreau adams silva chen novak"),
        },
        {"pages": (80, 900), "year": (1900, 2020)},
    ),
    Theme(
        "animals",
        "name",
        _pool("bella rocky luna max coco milo nala oliver ruby simba teddy zara"),
        {
            "species": _pool("lion zebra otter parrot tiger panda"),
            "zone": _pool("north south river forest"),
        },
        {"age": (1, 30), "weight": (2, 900)},
    ),
    Theme(
        "orders",
        "customer",
        PEOPLE,
        {
            "item": _pool("tea coffee bread cheese honey rice"),
            "status": _pool("open shipped closed"),
        },
        {"quantity": (1, 50), "total": (10, 999)},
    ),
)


@dataclass
class _Table:
    theme: Theme
    text_columns: list[str]
    numeric_columns: list[str]
    rows: list[dict[str, Any]]

    @property
    def columns(self) -> list[str]:
        return ["id", self.theme.label, *self.text_columns, *self.numeric_columns]

    def schema(self) -> str:
        types = {"id": "INTEGER", self.theme.label: "TEXT"}
        types.update({c: "TEXT" for c in self.text_columns})
        types.update({c: "INTEGER" for c in self.numeric_columns})
        cols = ", ".join(f"{c} {types[c]}" for c in self.columns)
        return f"{self.theme.table}({cols})"

    def context(self) -> str:
        """The sqlite3 script that builds this table (CREATE TABLE + INSERT rows)."""
        schema = self.schema().replace("(id INTEGER", "(id INTEGER PRIMARY KEY", 1)
        lines = [f"CREATE TABLE {schema};"]
        for row in self.rows:
            values = ", ".join(
                f"'{row[c]}'" if isinstance(row[c], str) else str(row[c]) for c in self.columns
            )
            lines.append(f"INSERT INTO {self.theme.table} VALUES ({values});")
        return "\n".join(lines)


def _random_table(rng: random.Random) -> _Table:
    theme = rng.choice(THEMES)
    text_columns = rng.sample(sorted(theme.text), rng.choice((1, 2)))
    numeric_columns = rng.sample(sorted(theme.numeric), rng.choice((1, 2)))
    n_rows = rng.randint(5, 8)
    labels = rng.sample(theme.labels, n_rows)
    # Distinct numbers per column: ORDER BY ... LIMIT then has exactly one right answer.
    numbers = {c: rng.sample(range(lo, hi + 1), n_rows) for c, (lo, hi) in theme.numeric.items()}
    rows = []
    for i in range(n_rows):
        row: dict[str, Any] = {"id": i + 1, theme.label: labels[i]}
        row.update({c: rng.choice(theme.text[c]) for c in text_columns})
        row.update({c: numbers[c][i] for c in numeric_columns})
        rows.append(row)
    return _Table(theme, text_columns, numeric_columns, rows)


def _sql_question(rng: random.Random, table: _Table) -> tuple[str, str]:
    """(English question, gold SQL) over ``table``; every gold query returns at least one row."""
    t, label = table.theme.table, table.theme.label
    num = rng.choice(table.numeric_columns)
    text = rng.choice(table.text_columns)
    values = sorted(row[num] for row in table.rows)
    word = rng.choice([row[text] for row in table.rows])
    kind = rng.choice(
        ("gt", "lt", "eq", "count_eq", "count_gt", "sum_eq", "top", "bottom", "max", "min")
    )
    a_num = f"an {num}" if num[0] in "aeiou" else f"a {num}"
    if kind == "gt":
        v = rng.choice(values[:-1])
        return (
            f"Which {t} have {a_num} greater than {v}? List their {label}.",
            f"SELECT {label} FROM {t} WHERE {num} > {v};",
        )
    if kind == "lt":
        v = rng.choice(values[1:])
        return (
            f"Which {t} have {a_num} less than {v}? List their {label}.",
            f"SELECT {label} FROM {t} WHERE {num} < {v};",
        )
    if kind == "eq":
        return (
            f"List the {label} of the {t} whose {text} is {word}.",
            f"SELECT {label} FROM {t} WHERE {text} = '{word}';",
        )
    if kind == "count_eq":
        return (
            f"How many {t} have {text} {word}?",
            f"SELECT COUNT(*) FROM {t} WHERE {text} = '{word}';",
        )
    if kind == "count_gt":
        v = rng.choice(values[:-1])
        return (
            f"How many {t} have {a_num} above {v}?",
            f"SELECT COUNT(*) FROM {t} WHERE {num} > {v};",
        )
    if kind == "sum_eq":
        return (
            f"What is the total {num} of the {t} with {text} {word}?",
            f"SELECT SUM({num}) FROM {t} WHERE {text} = '{word}';",
        )
    if kind in ("top", "bottom"):
        k = rng.randint(1, 3)
        extreme, order = ("highest", "DESC") if kind == "top" else ("lowest", "ASC")
        if k == 1:
            return (
                f"Which of the {t} has the {extreme} {num}? Give its {label}.",
                f"SELECT {label} FROM {t} ORDER BY {num} {order} LIMIT 1;",
            )
        return (
            f"Which {k} {t} have the {extreme} {num}? List their {label}.",
            f"SELECT {label} FROM {t} ORDER BY {num} {order} LIMIT {k};",
        )
    func, extreme = ("MAX", "highest") if kind == "max" else ("MIN", "lowest")
    return (f"What is the {extreme} {num} among the {t}?", f"SELECT {func}({num}) FROM {t};")


def sql_record(rng: random.Random) -> Record:
    table = _random_table(rng)
    question, gold = _sql_question(rng, table)
    return {
        "instruction": f"Write an SQL query for this question: {question}",
        "input": table.schema(),
        "output": gold,
        "context": table.context(),
    }


# --------------------------------------------------------------------------- splits


def _key(record: Record) -> tuple[str, str]:
    return record["instruction"], record["input"]


def _unique_records(
    make: Callable[[], Record], count: int, exclude: set[tuple[str, str]] | None = None
) -> list[Record]:
    """``count`` records with distinct (instruction, input), none of them in ``exclude``."""
    seen = set(exclude or ())
    records: list[Record] = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"cannot draw {count} distinct records")
        record = make()
        if _key(record) in seen:
            continue
        seen.add(_key(record))
        records.append(record)
    return records


def _finish(records: list[Record], domain: str, split: str) -> list[Record]:
    """Give each record its id and domain, with the contract's fields first."""
    out = []
    for index, record in enumerate(records):
        ordered = {"id": f"{domain}-{split}-{index:05d}", "domain": domain}
        ordered.update(record)
        out.append(ordered)
    return out


def generate_splits(seed: int, n_train: int, n_eval: int) -> dict[str, dict[str, list[Record]]]:
    """All JSONL splits of a family: {domain: {"train": [...], "eval": [...]}}.

    Eval records are drawn first and train records exclude them, so the held-out split is
    truly unseen. The compositional set is drawn from its own stream and excludes every maths
    problem of either split.
    """
    veltic = Veltic(seed)
    makers: dict[str, Callable[[random.Random], Record]] = {
        "lang": lambda r: lang_record(r, veltic),
        "math": math_record,
        "sql": sql_record,
    }
    splits: dict[str, dict[str, list[Record]]] = {}
    for domain, make in makers.items():
        rng = random.Random(f"{domain}-{seed}")
        held_out = _unique_records(lambda: make(rng), n_eval)  # noqa: B023
        train = _unique_records(lambda: make(rng), n_train, {_key(r) for r in held_out})  # noqa: B023
        splits[domain] = {
            "train": _finish(train, domain, "train"),
            "eval": _finish(held_out, domain, "eval"),
        }
    math_problems = {r["input"] for s in splits["math"].values() for r in s}
    rng = random.Random(f"compositional-{seed}")
    comp: list[Record] = []
    seen: set[str] = set()
    while len(comp) < n_eval:
        record = compositional_record(rng, veltic)
        if record["english_input"] in math_problems or record["english_input"] in seen:
            continue
        seen.add(record["english_input"])
        comp.append(record)
    splits["compositional"] = {"eval": _finish(comp, "compositional", "eval")}
    return splits
