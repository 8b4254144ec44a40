"""`stepsearch eval --data`: a column is named by its file's stem or an explicit NAME=FILE, never guessed from a
substring of the file name, and columns keep the order given."""
from __future__ import annotations

from pathlib import Path

import pytest

from stepsearch.eval import DatasetResult, EvalResult, dataset_files


def test_columns_are_named_by_file_stem_in_the_order_given():
    assert dataset_files("data/fanoutqa_hotpotqa.json,data/musique_ans.jsonl") == [
        ("fanoutqa_hotpotqa", Path("data/fanoutqa_hotpotqa.json")), ("musique_ans", Path("data/musique_ans.jsonl"))]


def test_name_equals_path_names_a_column():
    assert dataset_files("HotpotQA=data/hotpot_dev.json, 2Wiki = data/2wiki.json") == [
        ("HotpotQA", Path("data/hotpot_dev.json")), ("2Wiki", Path("data/2wiki.json"))]


def test_an_existing_file_with_an_equals_sign_is_a_bare_file(tmp_path):
    odd = tmp_path / "split=dev.jsonl"
    odd.write_text("")
    assert dataset_files(str(odd)) == [("split=dev", odd)]


@pytest.mark.parametrize(("spec", "message"), [
    ("a/dev.json,b/dev.json", "names two datasets 'dev'"),
    ("=data/x.json", "empty dataset name"),
])
def test_ambiguous_or_empty_names_are_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        dataset_files(spec)


def test_markdown_header_uses_the_names_as_given():
    result = DatasetResult(name="fanoutqa_hotpotqa", num_questions=1, em=1.0, f1=1.0, searches_per_question=1.0,
                           valid_format_rate=1.0, info_gain_per_search=None, redundancy_per_search=None, per_hop={})
    header = EvalResult({"fanoutqa_hotpotqa": result}, {}).markdown().splitlines()[0]
    assert header == "| metric | fanoutqa_hotpotqa | Avg. |"
