"""prune_plugin.datasets: the two data formats load as written, and broken files say where they are broken."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.lmeval import ME_PPL_DIR, write_edit_records
from prune_plugin.datasets import (
    COLLAPSE_PATH_ENV,
    EDIT_FIELDS,
    HARDEDIT_PATH_ENV,
    DataFormatError,
    default_edit_records_path,
    default_reference_corpus_path,
    load_edit_records,
    load_reference_sentences,
    resolve_edit_records_path,
    resolve_reference_corpus_path,
)

RECORD = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux, a native",
    "locality_prompt": "The mother tongue of Thomas Joannes Stieltjes is",
    "locality_ground_truth": "Dutch",
}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1), encoding="utf-8")
    return path


def edit_error(tmp_path: Path, data) -> str:
    path = write(tmp_path / "edits.json", data)
    with pytest.raises(DataFormatError) as info:
        load_edit_records(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_edit_records_load_with_extra_fields_kept(tmp_path):
    records = load_edit_records(write(tmp_path / "e.json", [RECORD, {**RECORD, "case_id": "x1", "relation": "P1"}]))
    assert records[0] == {**RECORD, "rephrase_prompts": [RECORD["rephrase_prompt"]],
                          "locality_prompts": [RECORD["locality_prompt"]]}
    assert records[1]["relation"] == "P1" and records[1]["case_id"] == "x1"


def test_several_paraphrase_and_neighbourhood_prompts_load_as_lists(tmp_path):
    record = {**RECORD, "rephrase_prompt": ["Danielle Darrieux, a native", "Danielle Darrieux spoke"],
              "locality_prompt": ["The mother tongue of Stieltjes is", "Rutger Hauer's mother tongue is"]}
    loaded, = load_edit_records(write(tmp_path / "e.json", [record]))
    assert loaded["rephrase_prompts"] == record["rephrase_prompt"]
    assert loaded["locality_prompts"] == record["locality_prompt"]
    # EasyEdit's editor takes one string per record: the first of each list.
    assert loaded["rephrase_prompt"] == "Danielle Darrieux, a native"
    assert loaded["locality_prompt"] == "The mother tongue of Stieltjes is"
    message = edit_error(tmp_path, [{**record, "locality_prompt": ["ok", 3]}])
    assert "record 0, field 'locality_prompt[1]': expected a string, got int 3" in message
    assert "field 'rephrase_prompt': empty list" in edit_error(tmp_path, [{**record, "rephrase_prompt": []}])


ROME_RECORD = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
                          "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this and Yossel goes still. Danielle Darrieux, a native",
                           "An album was recorded for Capitol Nashville. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Raymond Barre, a native"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_romes_counterfact_form_loads_as_easyedits(tmp_path):
    loaded, = load_edit_records(write(tmp_path / "counterfact.json", [ROME_RECORD]))
    assert {k: loaded[k] for k in EDIT_FIELDS} == {
        "case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_new": "English", "ground_truth": "French",
        "rephrase_prompt": ROME_RECORD["paraphrase_prompts"][0], "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French"}
    assert loaded["rephrase_prompts"] == ROME_RECORD["paraphrase_prompts"]
    assert loaded["locality_prompts"] == ROME_RECORD["neighborhood_prompts"]
    assert loaded["attribute_prompts"] == ROME_RECORD["attribute_prompts"]


@pytest.mark.parametrize("change, problem", [
    ({"requested_rewrite": {**ROME_RECORD["requested_rewrite"], "prompt": "The mother tongue of X is"}},
     "field 'requested_rewrite.prompt': has no '{}' where the subject goes"),
    ({"requested_rewrite": {**ROME_RECORD["requested_rewrite"], "target_new": "English"}},
     "field 'requested_rewrite.target_new': expected an object with a 'str' field"),
    ({"neighborhood_prompts": "Raymond Barre, a native"}, "field 'neighborhood_prompts': expected a list of strings"),
    ({"paraphrase_prompts": ["ok", ""]}, "field 'paraphrase_prompts[1]': empty text"),
])
def test_a_broken_rome_form_record_is_named(tmp_path, change, problem):
    assert f"record 0, {problem}" in edit_error(tmp_path, [{**ROME_RECORD, **change}])


def test_bad_json_names_file_line_and_column(tmp_path):
    message = edit_error(tmp_path, '[\n  {"case_id": 1,\n   "prompt": "x",,\n')
    assert "invalid JSON at line 3, column 18" in message


@pytest.mark.parametrize("field", EDIT_FIELDS)
def test_a_missing_field_is_named_with_its_record(tmp_path, field):
    broken = {k: v for k, v in RECORD.items() if k != field}
    message = edit_error(tmp_path, [RECORD, RECORD, broken])
    assert f"record 2, field '{field}': missing" in message


def test_a_wrong_type_is_named_with_what_was_found(tmp_path):
    message = edit_error(tmp_path, [{**RECORD, "target_new": ["English"]}])
    assert "record 0, field 'target_new': expected a string, got list ['English']" in message
    message = edit_error(tmp_path, [{**RECORD, "case_id": True}])
    assert "record 0, field 'case_id': expected an integer or string, got boolean True" in message


def test_empty_text_is_rejected(tmp_path):
    message = edit_error(tmp_path, [{**RECORD, "rephrase_prompt": "  "}])
    assert "record 0, field 'rephrase_prompt': empty text" in message


def test_an_edit_that_changes_nothing_is_rejected(tmp_path):
    message = edit_error(tmp_path, [{**RECORD, "target_new": "French "}])
    assert "record 0, field 'target_new': equals ground_truth" in message
    message = edit_error(tmp_path, [{**RECORD, "locality_ground_truth": "English"}])
    assert "record 0, field 'locality_ground_truth': equals target_new" in message


@pytest.mark.parametrize("data, problem", [
    ({"records": [RECORD]}, "expected a JSON list of records, got object"),
    ([], "the list of records is empty"),
    ([RECORD, "a sentence"], "record 1: expected a JSON object, got string 'a sentence'"),
])
def test_the_overall_shape_is_checked(tmp_path, data, problem):
    assert problem in edit_error(tmp_path, data)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_edit_records(tmp_path / "nowhere.json")


def test_non_utf8_text_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"Text": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.json: not UTF-8 text \(byte offset 14\)"):
        load_reference_sentences(path)


def test_reference_sentences_keep_their_leading_spaces(tmp_path):
    path = write(tmp_path / "s.json", [{"Corpus": "news", "Text": " Leading space."}, {"Text": "No corpus."}])
    assert load_reference_sentences(path) == [" Leading space.", "No corpus."]


@pytest.mark.parametrize("record, problem", [
    ({"Corpus": "news"}, "record 1, field 'Text': missing"),
    ({"Corpus": "news", "Text": ""}, "record 1, field 'Text': empty text"),
    ({"Corpus": "news", "Text": 3}, "record 1, field 'Text': expected a string, got int 3"),
    ({"Corpus": 1, "Text": "A sentence."}, "record 1, field 'Corpus': expected a string, got int 1"),
])
def test_broken_reference_records_are_named(tmp_path, record, problem):
    path = write(tmp_path / "s.json", [{"Corpus": "c", "Text": "Fine."}, record])
    with pytest.raises(DataFormatError) as info:
        load_reference_sentences(path)
    assert str(info.value) == f"{path}: {problem}"


def test_explicit_path_beats_environment_beats_shipped_default(tmp_path, monkeypatch):
    monkeypatch.delenv(HARDEDIT_PATH_ENV, raising=False)
    monkeypatch.delenv(COLLAPSE_PATH_ENV, raising=False)
    assert resolve_edit_records_path() == default_edit_records_path()
    assert resolve_reference_corpus_path() == default_reference_corpus_path()
    monkeypatch.setenv(HARDEDIT_PATH_ENV, str(tmp_path / "env.json"))
    monkeypatch.setenv(COLLAPSE_PATH_ENV, str(tmp_path / "env_s.json"))
    assert resolve_edit_records_path() == tmp_path / "env.json"
    assert resolve_reference_corpus_path() == tmp_path / "env_s.json"
    assert resolve_edit_records_path(tmp_path / "mine.json") == tmp_path / "mine.json"


def test_environment_variable_is_what_load_reads(tmp_path, monkeypatch):
    monkeypatch.setenv(HARDEDIT_PATH_ENV, str(write_edit_records(tmp_path / "edits.json")))
    assert len(load_edit_records()) == 8


def test_shipped_defaults_pass_validation():
    assert len(load_edit_records(default_edit_records_path())) >= 150
    assert len(load_reference_sentences(default_reference_corpus_path())) >= 300


@pytest.mark.skipif(not ME_PPL_DIR.exists(), reason=f"the paper's ME-PPL files are not at {ME_PPL_DIR}")
@pytest.mark.parametrize("name, count", [("ME-PPL_50.json", 50), ("ME-PPL_1k.json", 1000)])
def test_the_papers_me_ppl_files_load(name, count):
    texts = load_reference_sentences(ME_PPL_DIR / name)
    assert len(texts) == count and all(isinstance(t, str) and t.strip() for t in texts)
