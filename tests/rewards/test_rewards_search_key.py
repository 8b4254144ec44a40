"""Search-key reward r_key over M sub-question groups: "max" (paper) and "released" (the released code's
per-group overwrite), with hand-computed F1 values."""
import pytest

from stepsearch.rewards.search_key import search_key_reward

# Hand-computed F1 table (normalised tokens), group 1 = ["Paris capital"], group 2 = ["eiffel tower height",
# "tower height"]:
#   "capital of France"   G1: 1 common, P 1/3, R 1/2 -> 0.4         G2: 0
#   "Eiffel tower height" G1: 0                                    G2: 1.0
#   "Paris"               G1: 1 common, P 1, R 1/2 -> 2/3           G2: 0
#   "capital city"        G1: 1 common, P 1/2, R 1/2 -> 0.5         G2: 0
#   "tower capital"       G1: P 1/2, R 1/2 -> 0.5                   G2: max(0.4 vs k21, 0.5 vs k22) = 0.5 (a tie)
SEARCH_KEYS = [["Paris capital"], ["eiffel tower height", "tower height"]]
QUERIES = ["capital of France", "Eiffel tower height"]


def test_max_aggregation_hand_computed():
    # ((max(0.4, 0)) + max(0, 1.0)) / 2 = 0.7
    assert search_key_reward(QUERIES, SEARCH_KEYS, "max") == pytest.approx(0.7)


def test_released_each_query_fills_the_slot_of_its_best_group():
    # q1 -> G1 slot 0.4, q2 -> G2 slot 1.0: (0.4 + 1.0) / 2 = 0.7 in either order (a last-query rule gives 0.5 / 0.2).
    assert search_key_reward(QUERIES, SEARCH_KEYS, "released") == pytest.approx(0.7)
    assert search_key_reward(QUERIES[::-1], SEARCH_KEYS, "released") == pytest.approx(0.7)


def test_released_a_later_weaker_query_overwrites_and_a_zero_query_changes_nothing():
    queries = ["capital of France", "Eiffel tower height", "Paris", "capital city", "unrelated words"]
    # G1 slot: 0.4 -> 2/3 -> 0.5 (lowered); G2 slot 1.0; "unrelated words" scores 0 everywhere: (0.5 + 1.0) / 2.
    assert search_key_reward(queries, SEARCH_KEYS, "released") == pytest.approx(0.75)
    # The paper's max keeps the best query of each group: (2/3 + 1.0) / 2.
    assert search_key_reward(queries, SEARCH_KEYS, "max") == pytest.approx((2 / 3 + 1.0) / 2)


def test_released_ties_go_to_the_first_group():
    # "tower capital" scores 0.5 for both groups: credited to G1 only -> (0.5 + 0) / 2.
    assert search_key_reward(["tower capital"], SEARCH_KEYS, "released") == pytest.approx(0.25)
    # After G2 got 1.0 from another query, the tie still writes G1: (0.5 + 1.0) / 2.
    assert search_key_reward(["Eiffel tower height", "tower capital"], SEARCH_KEYS, "released") == pytest.approx(0.75)


def test_max_over_keys_of_a_sub_question():
    # "tower height" vs k_21 (P 1, R 2/3 -> 0.8) and vs k_22 (1.0): the best key wins.
    assert search_key_reward(["tower height"], [SEARCH_KEYS[1]]) == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", ["max", "released"])
def test_degenerate_inputs_give_zero(aggregation):
    assert search_key_reward([], SEARCH_KEYS, aggregation) == 0.0
    assert search_key_reward(QUERIES, [], aggregation) == 0.0
    assert search_key_reward([""], SEARCH_KEYS, aggregation) == 0.0
    assert search_key_reward(["", "the"], [["the"]], aggregation) == 0.0  # empty normalised query never scores


@pytest.mark.parametrize("aggregation", ["max", "released"])
def test_sub_question_without_keys_counts_in_m(aggregation):
    assert search_key_reward(["paris capital"], [["Paris capital"], []], aggregation) == pytest.approx(0.5)


def test_unicode_queries():
    assert search_key_reward(["Zürich Bahnhof"], [["zürich bahnhof"]]) == 1.0


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="aggregation"):
        search_key_reward(QUERIES, SEARCH_KEYS, "last")
