"""Search-key reward r_key = (1/M) sum_i agg_q max_j F1(q, k_ij), aggregations "max" (paper) and "last" (released)."""
import pytest

from stepsearch.rewards.search_key import search_key_reward

# Hand-computed F1 table (normalised tokens):
#   q1 "capital of France"   vs k_11 "Paris capital": 1 common, P 1/3, R 1/2 -> 0.4;  vs sub-question 2 keys -> 0
#   q2 "Eiffel tower height" vs k_11 -> 0;  vs k_21 "eiffel tower height" -> 1.0
SEARCH_KEYS = [["Paris capital"], ["eiffel tower height", "tower height"]]
QUERIES = ["capital of France", "Eiffel tower height"]


def test_max_aggregation_hand_computed():
    # ((max(0.4, 0)) + max(0, 1.0)) / 2 = 0.7
    assert search_key_reward(QUERIES, SEARCH_KEYS, "max") == pytest.approx(0.7)


def test_last_aggregation_scores_every_sub_question_with_the_last_query():
    # Only q2 counts: (0 + 1.0) / 2 = 0.5; with the queries reversed only q1 counts: (0.4 + 0) / 2 = 0.2.
    assert search_key_reward(QUERIES, SEARCH_KEYS, "last") == pytest.approx(0.5)
    assert search_key_reward(QUERIES[::-1], SEARCH_KEYS, "last") == pytest.approx(0.2)


def test_max_over_keys_of_a_sub_question():
    # "tower height" vs k_21 (P 1, R 2/3 -> 0.8) and vs k_22 (1.0): the best key wins.
    assert search_key_reward(["tower height"], [SEARCH_KEYS[1]]) == pytest.approx(1.0)


def test_degenerate_inputs_give_zero():
    assert search_key_reward([], SEARCH_KEYS) == 0.0
    assert search_key_reward(QUERIES, []) == 0.0
    assert search_key_reward([""], SEARCH_KEYS) == 0.0
    assert search_key_reward(["", "the"], [["the"]]) == 0.0  # empty normalised query never scores


def test_sub_question_without_keys_counts_in_m():
    assert search_key_reward(["paris capital"], [["Paris capital"], []]) == pytest.approx(0.5)


def test_unicode_queries():
    assert search_key_reward(["Zürich Bahnhof"], [["zürich bahnhof"]]) == 1.0


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="aggregation"):
        search_key_reward(QUERIES, SEARCH_KEYS, "mean")
