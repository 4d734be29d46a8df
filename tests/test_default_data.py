"""The contract of the two data sets that ship with prune-plugin (see prune_plugin/data/README.md).

- `reference_corpus.json`: sentences for the perplexity (collapse) probe, in the same record form as the
  paper's ME-PPL files, so that one loader reads both.
- `hardedit.json`: counterfactual edit requests in EasyEdit's CounterFact form, chosen to be hard for ROME:
  every prompt begins with its subject.

The files are read with plain `json`, from where the installed package keeps them, exactly as a user's code
would find them.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

DATA = files("prune_plugin") / "data"

GENRES_REQUIRED = {"encyclopedic", "news", "narrative", "conversational", "technical"}
GENRES_ALLOWED = GENRES_REQUIRED | {"instructional"}
MIN_SENTENCES = 300
MIN_PER_GENRE = 50
MAX_GENRE_RATIO = 1.5  # "roughly balanced": the largest genre is at most 1.5x the smallest
MIN_WORDS, MAX_WORDS = 10, 40

EDIT_FIELDS = {
    "case_id": int,
    "prompt": str,
    "subject": str,
    "target_new": str,
    "ground_truth": str,
    "rephrase_prompt": str,
    "locality_prompt": str,
    "locality_ground_truth": str,
}
MIN_RECORDS = 150
MIN_RELATIONS = 8
MAX_RELATION_SHARE = 0.30
MAX_ANSWER_WORDS = 3


def _load(name: str):
    with (DATA / name).open(encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return _load("reference_corpus.json")


@pytest.fixture(scope="module")
def edits() -> list[dict]:
    return _load("hardedit.json")


def _mentions(text: str, name: str) -> bool:
    """`name` occurs in `text` as a whole word or phrase (not inside a longer word)."""
    return re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text) is not None


# --------------------------------------------------------------------------------------------------------------
# reference_corpus.json
# --------------------------------------------------------------------------------------------------------------


def test_corpus_is_a_list_of_corpus_text_records(corpus):
    assert isinstance(corpus, list)
    for rec in corpus:
        assert isinstance(rec, dict)
        assert set(rec) == {"Corpus", "Text"}, rec
        assert isinstance(rec["Corpus"], str) and isinstance(rec["Text"], str), rec


def test_corpus_has_enough_sentences(corpus):
    assert len(corpus) >= MIN_SENTENCES


def test_corpus_genres_are_known_and_balanced(corpus):
    counts = Counter(rec["Corpus"] for rec in corpus)
    assert set(counts) <= GENRES_ALLOWED, set(counts) - GENRES_ALLOWED
    assert GENRES_REQUIRED <= set(counts), GENRES_REQUIRED - set(counts)
    for genre, n in counts.items():
        assert n >= MIN_PER_GENRE, (genre, n)
    assert max(counts.values()) <= MAX_GENRE_RATIO * min(counts.values()), counts


def test_every_text_is_one_sentence_with_a_single_leading_space(corpus):
    # Same convention as the ME-PPL files: " The river ...". The text continues a (virtual) preceding text, so
    # its first word is tokenized as it would be in running text.
    for rec in corpus:
        text = rec["Text"]
        assert text.startswith(" ") and not text.startswith("  "), repr(text)
        assert text[1].isupper() or text[1].isdigit(), repr(text)
        assert text == text.rstrip(), repr(text)
        assert "\n" not in text and "\t" not in text, repr(text)
        n_words = len(text.split())
        assert MIN_WORDS <= n_words <= MAX_WORDS, (n_words, text)


def test_corpus_has_no_duplicate_or_empty_texts(corpus):
    normalised = [" ".join(rec["Text"].split()).lower() for rec in corpus]
    assert all(normalised)
    dupes = [t for t, n in Counter(normalised).items() if n > 1]
    assert not dupes, dupes


# --------------------------------------------------------------------------------------------------------------
# hardedit.json
# --------------------------------------------------------------------------------------------------------------


def test_edits_have_the_counterfact_fields_with_the_right_types(edits):
    assert isinstance(edits, list)
    for rec in edits:
        assert isinstance(rec, dict)
        missing = set(EDIT_FIELDS) - set(rec)
        assert not missing, (missing, rec)
        for field, typ in EDIT_FIELDS.items():
            assert type(rec[field]) is typ, (field, rec)  # noqa: E721 (bool is not an int here)
        # Optional extra field (ignored by EasyEdit): the relation the fact belongs to.
        assert isinstance(rec.get("relation", ""), str)


def test_edits_have_enough_records(edits):
    assert len(edits) >= MIN_RECORDS


def test_case_ids_are_unique_and_run_from_zero(edits):
    assert sorted(rec["case_id"] for rec in edits) == list(range(len(edits)))


def test_text_fields_are_non_empty_and_trimmed(edits):
    for rec in edits:
        for field, typ in EDIT_FIELDS.items():
            if typ is str:
                value = rec[field]
                assert value.strip(), (field, rec)
                assert value == value.strip(), (field, repr(value))  # no leading/trailing space anywhere


def test_every_prompt_begins_with_its_subject(edits):
    # The hard case for ROME: the subject is at the very start of the prompt, so its last token has no prefix.
    for rec in edits:
        prompt, subject = rec["prompt"], rec["subject"]
        assert prompt.startswith(subject), rec
        rest = prompt[len(subject):]
        assert rest and not rest[0].isalnum(), rec  # the subject ends at a word boundary ("Toyota,", "Brazil's")


def test_prompts_are_cloze_prefixes_without_the_answer(edits):
    for rec in edits:
        for prompt_field in ("prompt", "rephrase_prompt"):
            prompt = rec[prompt_field]
            assert not _mentions(prompt, rec["ground_truth"]), (prompt_field, rec)
            assert not _mentions(prompt, rec["target_new"]), (prompt_field, rec)
        assert not _mentions(rec["locality_prompt"], rec["locality_ground_truth"]), rec


def test_answers_are_short(edits):
    for rec in edits:
        for field in ("target_new", "ground_truth", "locality_ground_truth"):
            assert 1 <= len(rec[field].split()) <= MAX_ANSWER_WORDS, (field, rec)


def test_target_new_is_a_real_change(edits):
    for rec in edits:
        assert rec["target_new"].casefold() != rec["ground_truth"].casefold(), rec


def test_rephrase_asks_the_same_question_differently(edits):
    for rec in edits:
        assert rec["rephrase_prompt"] != rec["prompt"], rec
        assert _mentions(rec["rephrase_prompt"], rec["subject"]), rec


def test_locality_prompt_is_about_another_entity(edits):
    for rec in edits:
        # Equal answers would make a kept neighbour and a leaked edit score the same.
        assert rec["locality_ground_truth"].casefold() != rec["target_new"].casefold(), rec
        assert rec["locality_prompt"] != rec["prompt"], rec
        assert not _mentions(rec["locality_prompt"], rec["subject"]), rec


def test_locality_facts_are_never_edited_by_the_set(edits):
    # A neighbour must stay true for a whole sequential run over the file, so no record edits its entity.
    subjects = {rec["subject"] for rec in edits}
    for rec in edits:
        for subject in subjects:
            assert not _mentions(rec["locality_prompt"], subject), (subject, rec["locality_prompt"])


def test_no_subject_is_edited_twice_for_the_same_relation(edits):
    assert all(rec.get("relation") for rec in edits), "every record names its relation"
    pairs = Counter((rec["subject"], rec["relation"]) for rec in edits)
    assert not [p for p, n in pairs.items() if n > 1]
    prompts = Counter(rec["prompt"] for rec in edits)
    assert not [p for p, n in prompts.items() if n > 1]


def test_relations_are_many_and_none_dominates(edits):
    counts = Counter(rec["relation"] for rec in edits)
    assert len(counts) >= MIN_RELATIONS, counts
    assert max(counts.values()) <= MAX_RELATION_SHARE * len(edits), counts
