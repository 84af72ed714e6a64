"""Veltic: the family's constructed language, a deterministic transformation of English.

The DAM paper merges a Japanese model with maths models. We have no Japanese corpus offline, so
the family invents a language that a small model can learn in a minute yet that is genuinely
not English: every English word of a controlled vocabulary maps to an invented root built from
Veltic's own syllable inventory, morphology is marked by suffixes (plural nouns, past-tense
verbs; verbs do not agree with their subject), adjectives follow their noun, and the verb of
every clause moves to the end of it (SOV). Names and numbers are kept as they are.

The lexicon is drawn from ``random.Random(seed)``, so each family seed has its own language,
and it is a bijection: every Veltic surface form parses back to exactly one lemma and feature.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

LANGUAGE_NAME = "Veltic"

NAMES = ("Tom", "Mia", "Sam", "Lena", "Ben", "Ana", "Leo", "Ivy", "Max", "Zoe", "Omar", "Rosa")
MALE_NAMES = frozenset({"Tom", "Sam", "Ben", "Leo", "Max", "Omar"})

# Nouns: lemma -> English plural (regular unless given).
NOUNS: dict[str, str] = {
    **{
        w: w + "s"
        for w in [
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
            "river",
            "tree",
            "house",
            "garden",
            "road",
            "stone",
            "book",
            "letter",
            "song",
            "story",
            "apple",
            "coin",
            "bag",
            "hill",
            "field",
            "forest",
            "boat",
            "ship",
            "door",
            "window",
            "cup",
            "flower",
            "star",
            "moon",
            "sun",
            "lamp",
            "ball",
            "pencil",
            "card",
            "egg",
            "cookie",
            "basket",
            "cake",
            "shell",
            "marble",
            "sticker",
            "problem",
            "answer",
            "end",
            "number",
            "bottle",
            "shop",
            "market",
            "bridge",
            "lake",
            "table",
            "chair",
            "room",
            "sister",
            "brother",
            "mother",
            "father",
            "baker",
            "sailor",
        ]
    },
    "box": "boxes",
    "child": "children",
    "man": "men",
    "woman": "women",
    "city": "cities",
    "village": "villages",
    "fox": "foxes",
    "glass": "glasses",
}

# Verbs: lemma -> (third person singular present, past).
VERBS: dict[str, tuple[str, str]] = {
    **{
        w: (w + "s", w + "ed")
        for w in [
            "want",
            "help",
            "visit",
            "watch",
            "follow",
            "paint",
            "open",
            "walk",
            "jump",
            "laugh",
            "rest",
            "look",
            "call",
            "work",
            "play",
            "clean",
            "climb",
        ]
    },
    "watch": ("watches", "watched"),
    "like": ("likes", "liked"),
    "love": ("loves", "loved"),
    "close": ("closes", "closed"),
    "dance": ("dances", "danced"),
    "share": ("shares", "shared"),
    "carry": ("carries", "carried"),
    "see": ("sees", "saw"),
    "find": ("finds", "found"),
    "take": ("takes", "took"),
    "have": ("has", "had"),
    "buy": ("buys", "bought"),
    "sell": ("sells", "sold"),
    "give": ("gives", "gave"),
    "eat": ("eats", "ate"),
    "lose": ("loses", "lost"),
    "build": ("builds", "built"),
    "write": ("writes", "wrote"),
    "make": ("makes", "made"),
    "hold": ("holds", "held"),
    "bring": ("brings", "brought"),
    "catch": ("catches", "caught"),
    "run": ("runs", "ran"),
    "sleep": ("sleeps", "slept"),
    "sing": ("sings", "sang"),
    "swim": ("swims", "swam"),
    "get": ("gets", "got"),
    "put": ("puts", "putted"),  # "put" is both present and past in English; past unused
    "solve": ("solves", "solved"),
    "do": ("does", "did"),
}
BE_FORMS = {"is": "present", "are": "present", "was": "past", "were": "past"}

ADJECTIVES = tuple(
    [
        "big",
        "small",
        "old",
        "young",
        "red",
        "green",
        "blue",
        "happy",
        "quiet",
        "bright",
        "dark",
        "tall",
        "warm",
        "cold",
        "new",
        "kind",
        "brave",
        "little",
        "white",
        "black",
        "same",
    ]
)
FUNCTION_WORDS = tuple(
    [
        "the",
        "a",
        "this",
        "that",
        "every",
        "some",
        "my",
        "his",
        "her",
        "their",
        "its",
        "he",
        "she",
        "they",
        "it",
        "we",
        "i",
        "you",
        "him",
        "them",
        "us",
        "me",
        "in",
        "on",
        "near",
        "under",
        "with",
        "to",
        "from",
        "behind",
        "across",
        "into",
        "at",
        "of",
        "for",
        "and",
        "but",
        "then",
        "now",
        "today",
        "yesterday",
        "often",
        "again",
        "quickly",
        "slowly",
        "how",
        "many",
        "more",
        "each",
        "equally",
        "times",
        "as",
        "what",
        "which",
        "who",
        "there",
        "not",
    ]
)

VOWELS = "aeiou"
CONSONANTS = "ptkbdgmnlrsvz"
PLURAL_SUFFIX = "en"
PAST_SUFFIX = "ra"

_WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_CLAUSE_END = {".", ",", "?", "!", ";", ":"}
_CONJUNCTIONS = {"and", "but"}


@dataclass(frozen=True)
class Analysis:
    """An English word form taken apart: its lemma, part of speech and inflection."""

    lemma: str
    pos: str  # noun | verb | adj | func
    feature: str  # sg | pl | present | past | ""


def _english_analyses() -> dict[str, Analysis]:
    """Every English surface form of the vocabulary -> its analysis (one each)."""
    table: dict[str, Analysis] = {}

    def add(form: str, analysis: Analysis) -> None:
        if form in table and table[form] != analysis:
            raise ValueError(f"ambiguous English form {form!r}")
        table[form] = analysis

    for lemma, plural in NOUNS.items():
        add(lemma, Analysis(lemma, "noun", "sg"))
        add(plural, Analysis(lemma, "noun", "pl"))
    for lemma, (third, past) in VERBS.items():
        add(lemma, Analysis(lemma, "verb", "present"))
        add(third, Analysis(lemma, "verb", "present"))
        add(past, Analysis(lemma, "verb", "past"))
    for form, feature in BE_FORMS.items():
        add(form, Analysis("be", "verb", feature))
    for word in ADJECTIVES:
        add(word, Analysis(word, "adj", ""))
    for word in FUNCTION_WORDS:
        add(word, Analysis(word, "func", ""))
    return table


ENGLISH = _english_analyses()
LEMMAS: dict[str, str] = {a.lemma: a.pos for a in ENGLISH.values()}


_RESERVED = frozenset(ENGLISH) | {name.lower() for name in NAMES}


def _taken(form: str) -> bool:
    """Veltic words never coincide with an English word or a name, so the two never mix."""
    return form in _RESERVED


def _syllable(rng: random.Random) -> str:
    return rng.choice(CONSONANTS) + rng.choice(VOWELS)


class Veltic:
    """The language of one family seed: a bijective lexicon plus Veltic's grammar rules."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"veltic-{seed}")
        self.roots: dict[str, str] = {}
        self.surface: dict[str, Analysis] = {}
        for lemma in sorted(LEMMAS):
            pos = LEMMAS[lemma]
            while True:
                root = self._draw_root(rng, pos)
                forms = self._forms(root, pos)
                if not any(_taken(form) or form in self.surface for form, _ in forms):
                    break
            self.roots[lemma] = root
            for form, feature in forms:
                self.surface[form] = Analysis(lemma, pos, feature)

    @staticmethod
    def _draw_root(rng: random.Random, pos: str) -> str:
        """Function words are short (one syllable, maybe closed); content words 2-3 syllables."""
        if pos == "func":
            root = _syllable(rng)
            return root + rng.choice(("", "", "n", "l", "s"))
        root = "".join(_syllable(rng) for _ in range(rng.choice((2, 2, 3))))
        return root + rng.choice(("", "", "", "n", "k", "l", "r"))

    @staticmethod
    def _forms(root: str, pos: str) -> list[tuple[str, str]]:
        if pos == "noun":
            return [(root, "sg"), (root + PLURAL_SUFFIX, "pl")]
        if pos == "verb":
            return [(root, "present"), (root + PAST_SUFFIX, "past")]
        return [(root, "")]

    # -- words ------------------------------------------------------------------------------
    def word(self, analysis: Analysis) -> str:
        """The Veltic form of one analysed word."""
        root = self.roots[analysis.lemma]
        if analysis.feature == "pl":
            return root + PLURAL_SUFFIX
        if analysis.feature == "past":
            return root + PAST_SUFFIX
        return root

    def parse_word(self, form: str) -> Analysis:
        """The inverse of :meth:`word` (raises KeyError for a form that is not Veltic)."""
        return self.surface[form.lower()]

    # -- sentences ---------------------------------------------------------------------------
    def translate(self, english: str) -> str:
        """English text of the controlled vocabulary -> Veltic (KeyError on an unknown word)."""
        tokens = _WORD.findall(english)
        out: list[str] = []
        clause: list[tuple[str, Analysis | None]] = []
        for token in tokens:
            if token in _CLAUSE_END or token.lower() in _CONJUNCTIONS:
                out.extend(self._render_clause(clause))
                clause = []
                out.append(token if token in _CLAUSE_END else self.word(ENGLISH[token.lower()]))
                continue
            clause.append((token, _analyse(token)))
        out.extend(self._render_clause(clause))
        return _detokenize(out)

    def _render_clause(self, clause: list[tuple[str, Analysis | None]]) -> list[str]:
        """Apply Veltic word order to one clause (noun-adjective, verb-final) and map words."""
        reordered = _verb_final(_adjective_after_noun(clause))
        return [token if a is None else self.word(a) for token, a in reordered]


def _analyse(token: str) -> Analysis | None:
    """None for tokens Veltic keeps unchanged (numbers, names); KeyError for unknown words."""
    if token.isdigit() or token in NAMES:
        return None
    return ENGLISH[token.lower()]


Token = tuple[str, "Analysis | None"]


def _adjective_after_noun(clause: list[Token]) -> list[Token]:
    out: list[Token] = []
    pending: list[Token] = []
    for item in clause:
        analysis = item[1]
        if analysis is not None and analysis.pos == "adj":
            pending.append(item)
            continue
        if analysis is not None and analysis.pos == "noun" and pending:
            out.append(item)
            out.extend(pending)
        else:
            out.extend(pending)
            out.append(item)
        pending = []
    out.extend(pending)
    return out


def _verb_final(clause: list[Token]) -> list[Token]:
    for index, (_, analysis) in enumerate(clause):
        if analysis is not None and analysis.pos == "verb":
            return clause[:index] + clause[index + 1 :] + [clause[index]]
    return clause


def _detokenize(tokens: list[str]) -> str:
    """Join tokens with spaces, attach punctuation, capitalise each sentence."""
    text = ""
    capitalise = True
    for token in tokens:
        if token in _CLAUSE_END:
            text += token
            capitalise = token in {".", "?", "!"}
            continue
        word = token.capitalize() if capitalise and token not in NAMES else token
        text += (" " if text else "") + word
        capitalise = False
    return text


def english_forms(analysis: Analysis) -> set[str]:
    """Every English surface form with this analysis (used to check invertibility)."""
    return {form for form, a in ENGLISH.items() if a == analysis}
