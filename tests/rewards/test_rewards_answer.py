"""Answer metrics and format checks: SQuAD normalisation, EM/F1 over aliases, last-answer extraction, format rule."""
import pytest

from stepsearch.rewards.answer import exact_match, extract_answer, f1_score, is_valid_format, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("U.S.A.", "usa"),
        ("an apple a day", "apple day"),
        ("Theatre of the Absurd", "theatre of absurd"),
        ("  Café\tÜNÏCODE\n", "café ünïcode"),
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_alias_and_normalises():
    assert exact_match("The Eiffel Tower.", ["eiffel tower", "la tour eiffel"]) == 1.0
    assert exact_match("Tour Eiffel", ["eiffel tower", "la tour eiffel"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0  # a bare string is one alias
    assert exact_match(None, ["paris"]) == 0.0
    assert exact_match("paris", []) == 0.0


def test_f1_hand_computed():
    # [big, red, dog] vs [red, dog, barks]: 2 common, precision 2/3, recall 2/3 -> F1 2/3.
    assert f1_score("the big red dog", ["red dog barks"]) == pytest.approx(2 / 3)
    # [capital, of, france] vs [paris, capital]: 1 common, P = 1/3, R = 1/2 -> F1 = 2PR/(P+R) = 0.4.
    assert f1_score("capital of France", ["Paris capital"]) == pytest.approx(0.4)


def test_f1_counts_repeated_tokens_as_a_multiset():
    # Counter intersection {xx: 1, yy: 1}: 2 common of 3 each -> 2/3 (a set overlap would wrongly give 1.0).
    assert f1_score("xx xx yy", ["xx yy yy"]) == pytest.approx(2 / 3)


def test_f1_is_max_over_golds_and_zero_without_overlap():
    assert f1_score("red dog", ["blue cat", "red dog"]) == 1.0
    assert f1_score("red dog", ["blue cat"]) == 0.0
    assert f1_score(None, ["red dog"]) == 0.0
    assert f1_score("red dog", []) == 0.0


def test_empty_prediction_earns_no_f1_but_can_match_exactly_an_empty_alias():
    # SQuAD v1.1: no common tokens -> F1 0, even for two empty token lists; EM compares normalised strings.
    assert f1_score("", ["the"]) == 0.0
    assert exact_match("", ["the"]) == 1.0


def test_unicode_answers():
    assert exact_match("Zürich", ["zürich"]) == 1.0
    assert f1_score("東京 タワー", ["東京"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>no answer</think>", None),
        ("<answer>first</answer> then <answer> second </answer>", "second"),
        ("<answer>a<answer>b</answer>", "b"),  # the last block has no nested tag
        ("<answer>kept</answer> <answer>never closed", "kept"),
        ("<answer>\n multi\nline \n</answer>", "multi\nline"),
        ("<answer></answer>", ""),
        ("<answer>Ünïcode 答案</answer>", "Ünïcode 答案"),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>t</think><answer>Paris</answer>", True),
        ("<answer>Paris</answer>\n  \n", True),
        ("<answer>old</answer><search>q</search><information>i</information><answer>new</answer>", True),
        ("<answer>Paris</answer> trailing words", False),
        ("<answer>Paris</answer><|im_end|>", False),  # the caller strips the EOS string first
        ("<answer>Paris</answer></answer>", False),
        ("<answer>Paris</answer><answer>unclosed", False),
        ("<answer>Paris</answer><search>more</search>", False),
        ("<think>no answer</think>", False),
        ("Paris</answer>", False),
        ("", False),
    ],
)
def test_is_valid_format(text, expected):
    assert is_valid_format(text) is expected
