"""The family's data generators, checked against independent references (fast tests)."""

from __future__ import annotations

import re
import sqlite3

import pytest

from dammerge.family.corpus import stdlib_corpus
from dammerge.family.lang import ENGLISH, NAMES, PAST_SUFFIX, PLURAL_SUFFIX, Veltic, english_forms
from dammerge.family.tasks import generate_splits
from dammerge.scoring.metrics import build_database, run_query, score_record
from dammerge.templates import alpaca_prompt

N_TRAIN, N_EVAL = 400, 60


@pytest.fixture(scope="module")
def splits():
    return generate_splits(7, N_TRAIN, N_EVAL)


def test_split_sizes_and_contract_fields(splits):
    for domain in ("lang", "math", "sql"):
        assert len(splits[domain]["train"]) == N_TRAIN
        assert len(splits[domain]["eval"]) == N_EVAL
    assert len(splits["compositional"]["eval"]) == N_EVAL
    for domain, parts in splits.items():
        for records in parts.values():
            ids = [r["id"] for r in records]
            assert len(set(ids)) == len(ids)
            for r in records:
                assert r["domain"] == domain
                assert all(isinstance(r[k], str) for k in ("instruction", "input", "output"))
                assert r["output"].strip()


def test_generation_is_deterministic_and_seeded():
    assert generate_splits(3, 50, 10) == generate_splits(3, 50, 10)
    other = generate_splits(4, 50, 10)
    assert other["math"]["train"] != generate_splits(3, 50, 10)["math"]["train"]


def test_eval_never_repeats_a_train_prompt(splits):
    for domain in ("lang", "math", "sql"):
        train = {(r["instruction"], r["input"]) for r in splits[domain]["train"]}
        assert not train & {(r["instruction"], r["input"]) for r in splits[domain]["eval"]}


# --------------------------------------------------------------------------- SQL


def test_every_gold_query_executes_on_its_context_and_returns_rows(splits):
    for records in splits["sql"].values():
        for r in records:
            conn = build_database(r["context"])
            rows = run_query(conn, r["output"].rstrip(";"))
            assert rows, r["output"]
            assert all(value is not None for row in rows for value in row), r
            assert score_record("execution", r["output"], r) == 1.0


def test_sql_schema_in_input_matches_the_context(splits):
    for r in splits["sql"]["eval"]:
        table, columns = re.fullmatch(r"(\w+)\((.*)\)", r["input"]).groups()
        conn = sqlite3.connect(":memory:")
        conn.executescript(r["context"])
        actual = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        assert actual == [c.split()[0] for c in columns.split(", ")]


def test_order_by_questions_have_a_unique_answer(splits):
    """Numbers are distinct per column, so LIMIT k after ORDER BY has no ties to break."""
    for r in splits["sql"]["train"]:
        match = re.search(r"ORDER BY (\w+)", r["output"])
        if match:
            conn = build_database(r["context"])
            values = [
                row[0]
                for row in run_query(
                    conn, f"SELECT {match.group(1)} FROM " + r["input"].split("(")[0]
                )
            ]
            assert len(values) == len(set(values))


# --------------------------------------------------------------------------- maths


def brute_force(problem: str) -> int:
    """Replay the problem's operations sentence by sentence (an independent reader)."""
    total = None
    for sentence in re.split(r"(?<=[.?])\s+", problem):
        bags = re.search(r"(\d+) (?:more )?bags with (\d+) \w+ in each bag", sentence)
        numbers = [int(n) for n in re.findall(r"\d+", sentence)]
        if total is None:
            total = numbers[0] * numbers[1] if bags else numbers[0]
        elif bags:
            total += int(bags.group(1)) * int(bags.group(2))
        elif re.search(r"\b(buys|finds|gives (him|her)) \d+ more\b", sentence):
            total += numbers[0]
        elif re.search(r"\b(gives|loses|sells|eats) \d+\b", sentence):
            total -= numbers[0]
        elif "into" in sentence and "boxes" in sentence:
            assert total % numbers[0] == 0
            total //= numbers[0]
        else:
            assert sentence.startswith("How many"), sentence
    return total


def test_every_math_answer_matches_a_brute_force_replay(splits):
    records = splits["math"]["train"] + splits["math"]["eval"]
    records += splits["compositional"]["eval"]
    for r in records:
        problem = r.get("english_input", r["input"])
        assert int(r["answer"]) == brute_force(problem), problem
        assert r["output"].endswith(f"The answer is {r['answer']}.")
        assert score_record("exact_match", r["output"], r) == 1.0


def test_worked_solutions_are_correct_arithmetic_with_two_or_three_steps(splits):
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a / b,
    }
    for r in splits["math"]["train"]:
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["output"])
        assert 2 <= len(equations) <= 3, r["output"]
        for a, op, b, c in equations:
            assert ops[op](int(a), int(b)) == int(c)
        assert int(equations[-1][3]) == int(r["answer"])
        assert 0 < int(r["answer"]) < 200


# --------------------------------------------------------------------------- Veltic


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_veltic_is_invertible_on_the_lexicon(seed):
    veltic = Veltic(seed)
    for form, analysis in ENGLISH.items():
        velt = veltic.word(analysis)
        back = veltic.parse_word(velt)
        assert form in english_forms(back)
        assert back.lemma == analysis.lemma and back.feature == analysis.feature
    surfaces = list(veltic.surface)
    assert len(surfaces) == len(set(surfaces))
    assert not set(surfaces) & set(ENGLISH)
    assert not set(surfaces) & {n.lower() for n in NAMES}


def test_veltic_morphology_and_word_order():
    veltic = Veltic(0)
    dog, dogs = veltic.roots["dog"], veltic.roots["dog"] + PLURAL_SUFFIX
    see = veltic.roots["see"]
    assert (
        veltic.translate("The dog sees Mia.")
        == f"{veltic.roots['the'].capitalize()} {dog} Mia {see}."
    )
    assert veltic.translate("The dogs saw Mia.").endswith(f"{dogs} Mia {see}{PAST_SUFFIX}.")
    red = veltic.roots["red"]
    assert f"{veltic.roots['ball']} {red}" in veltic.translate("Tom has a red ball.")
    assert veltic.translate("Tom has 12 balls.").startswith("Tom 12 ")
    with pytest.raises(KeyError):
        veltic.translate("The dog reads a newspaper.")


def test_languages_differ_between_seeds():
    assert Veltic(0).roots != Veltic(1).roots


def test_lang_records_are_veltic_or_english_of_the_same_meaning(splits):
    veltic = Veltic(7)
    for r in splits["lang"]["train"][:200]:
        if "into Veltic" in r["instruction"]:
            assert veltic.translate(r["input"]) == r["output"]
        elif "into English" in r["instruction"]:
            assert veltic.translate(r["output"]) == r["input"]
        else:
            words = re.findall(r"[a-z]+", (r["input"] + " " + r["output"]).lower())
            for word in words:
                if word not in {n.lower() for n in NAMES}:
                    veltic.parse_word(word)


# --------------------------------------------------------------------------- compositional


def test_compositional_set_is_maths_in_veltic_and_unseen(splits):
    veltic = Veltic(7)
    train_prompts = {
        (r["instruction"], r["input"]) for d in ("lang", "math", "sql") for r in splits[d]["train"]
    }
    math_problems = {r["input"] for part in splits["math"].values() for r in part}
    comp = splits["compositional"]["eval"]
    assert comp
    for r in comp:
        assert (r["instruction"], r["input"]) not in train_prompts
        assert r["english_input"] not in math_problems
        assert r["input"] == veltic.translate(r["english_input"])
        assert not {"has", "buys", "many", "apples"} & set(r["input"].lower().split())


# --------------------------------------------------------------------------- corpus / tokenizer


def test_stdlib_corpus_is_deterministic_english_and_capped():
    first = stdlib_corpus(20_000)
    assert first == stdlib_corpus(20_000)
    assert 20_000 <= sum(len(p) + 1 for p in first) < 20_000 + 5_000
    assert all(len(p) >= 40 for p in first)


def test_tokenizer_splits_digits_and_adds_no_special_tokens(splits, tmp_path):
    from transformers import AutoTokenizer

    from dammerge.family.tokenizer import train_tokenizer

    texts = stdlib_corpus(20_000) + [r["output"] for r in splits["math"]["train"]]
    train_tokenizer(texts, 600).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("He has 123 apples.")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "Ġ1" in pieces and "2" in pieces and "3" in pieces
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    prompt = alpaca_prompt("Solve the problem.", "Tom has 5 apples.")
    assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
