"""Benchmark: step rewards (G^t, P^t) of a rollout batch, ours (batched numpy TF-IDF) versus scikit-learn.

Workload: `--trajectories` trajectories of `--rounds` search rounds with `--docs` retrieved passages each, grouped
`--samples` trajectories per question (each question has 2-4 golden docs); passages are ~100-word texts drawn from a
Zipf vocabulary, and half of each round's passages repeat earlier ones, as real rollouts do.

Methods (all produce the same gains and penalties; the max difference to scikit-learn is reported):
- sklearn_per_doc: the released code's approach, a `TfidfVectorizer` fitted on [doc] + golden and
  `cosine_similarity` for every retrieved passage, then the memory / redundancy loop.
- ours_per_doc: our `tfidf_cosine` called per passage (golden docs re-tokenised each time).
- ours_step_rewards: `step_rewards` per trajectory (golden tokenised once per trajectory, distinct texts once).
- ours_group: `step_rewards_group` per question (golden tokenised once per question, texts shared by its samples).

Prints a table and writes long-format CSV to benchmarks/results/step_reward.csv. `--quick` runs in seconds.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import bench_common
import numpy as np

from stepsearch.rewards.answer import normalize_answer
from stepsearch.rewards.step import step_rewards, step_rewards_group, tfidf_cosine

RESULTS = Path(__file__).parent / "results" / "step_reward.csv"


def make_workload(num_trajectories, num_rounds, docs_per_round, samples_per_question, seed=0):
    """Questions as (golden_docs, trajectories), trajectories being lists of rounds of (doc_id, text)."""
    rng = random.Random(seed)
    vocabulary = [f"w{index}" for index in range(5000)]
    zipf_weights = [1 / (rank + 1) for rank in range(len(vocabulary))]

    def passage():
        return " ".join(rng.choices(vocabulary, weights=zipf_weights, k=rng.randint(60, 140))) + "."

    corpus = [(f"doc{index}", passage()) for index in range(4 * num_trajectories * docs_per_round)]
    questions = []
    for start in range(0, num_trajectories, samples_per_question):
        golden = [text for _, text in rng.sample(corpus, rng.randint(2, 4))]
        trajectories = []
        for _ in range(min(samples_per_question, num_trajectories - start)):
            seen: list[tuple[str, str]] = []
            rounds = []
            for _ in range(num_rounds):
                docs = [
                    rng.choice(seen) if seen and rng.random() < 0.5 else rng.choice(corpus)
                    for _ in range(docs_per_round)
                ]
                seen.extend(docs)
                rounds.append(docs)
            trajectories.append(rounds)
        questions.append((golden, trajectories))
    return questions


def gains_and_penalties_from(cosine_rows, rounds, num_golden):
    """The G^t / P^t loop over precomputed per-passage cosines (doc-id identity), shared by the per-doc methods."""
    memory = np.zeros(num_golden)
    seen: set[str] = set()
    gains, penalties = [], []
    for round_docs, rows in zip(rounds, cosine_rows):
        coverage = np.max(rows, axis=0)
        gains.append(float(np.maximum(coverage - memory, 0.0).mean()))
        memory = np.maximum(memory, coverage)
        penalties.append(sum(doc_id in seen for doc_id, _ in round_docs) / len(round_docs))
        seen.update(doc_id for doc_id, _ in round_docs)
    return gains, penalties


def sklearn_per_doc(questions):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    results = []
    for golden, trajectories in questions:
        normalized_golden = [normalize_answer(text) for text in golden]
        for rounds in trajectories:
            cosine_rows = []
            for round_docs in rounds:
                rows = []
                for _, text in round_docs:
                    matrix = TfidfVectorizer().fit_transform([normalize_answer(text), *normalized_golden])
                    rows.append(cosine_similarity(matrix[:1], matrix[1:])[0])
                cosine_rows.append(rows)
            results.append(gains_and_penalties_from(cosine_rows, rounds, len(golden)))
    return results


def ours_per_doc(questions):
    results = []
    for golden, trajectories in questions:
        for rounds in trajectories:
            cosine_rows = [[tfidf_cosine(text, golden) for _, text in round_docs] for round_docs in rounds]
            results.append(gains_and_penalties_from(cosine_rows, rounds, len(golden)))
    return results


def ours_step_rewards(questions):
    return [step_rewards(rounds, golden) for golden, trajectories in questions for rounds in trajectories]


def ours_group(questions):
    return [result for golden, trajectories in questions for result in step_rewards_group(trajectories, golden)]


METHODS = {
    "sklearn_per_doc": sklearn_per_doc,
    "ours_per_doc": ours_per_doc,
    "ours_step_rewards": ours_step_rewards,
    "ours_group": ours_group,
}


def max_difference(results, reference):
    return max(
        float(np.max(np.abs(np.array(ours) - np.array(theirs)), initial=0.0))
        for result, expected in zip(results, reference)
        for ours, theirs in zip(result, expected)
    )


def best_time(function, questions, repeats):
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = function(questions)
        timings.append(time.perf_counter() - start)
    return min(timings), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=5, help="trajectories per question")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 trajectories x 3 rounds, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.trajectories, args.rounds, args.repeats = 32, 3, 1

    questions = make_workload(args.trajectories, args.rounds, args.docs, args.samples)
    workload = dict(trajectories=args.trajectories, rounds=args.rounds, docs=args.docs, samples=args.samples)
    rows = []
    reference_seconds, reference_results = None, None
    print(f"step rewards: {workload}")
    print(f"{'method':<20}{'total s':>10}{'ms/traj':>10}{'speedup':>10}{'max |diff|':>13}")
    for name, function in METHODS.items():
        seconds, results = best_time(function, questions, args.repeats)
        if reference_results is None:
            reference_seconds, reference_results = seconds, results
        metrics = {
            "seconds": seconds,
            "ms_per_trajectory": 1e3 * seconds / args.trajectories,
            "speedup_vs_sklearn": reference_seconds / seconds,
            "max_abs_diff_vs_sklearn": max_difference(results, reference_results),
        }
        print(
            f"{name:<20}{metrics['seconds']:>10.3f}{metrics['ms_per_trajectory']:>10.3f}"
            f"{metrics['speedup_vs_sklearn']:>9.1f}x{metrics['max_abs_diff_vs_sklearn']:>13.1e}"
        )
        rows.extend({"benchmark": "step_reward", **workload, "method": name, "metric": metric, "value": value}
                    for metric, value in metrics.items())

    bench_common.write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
