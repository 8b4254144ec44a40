"""Evaluation of the search agent: greedy rollouts on QA files, EM/F1 per dataset in the paper's table layout.

`stepsearch eval --model PATH --data FILE[,FILE…] --retriever URL|DIR|CORPUS.jsonl [--format auto]
[--max-questions N] [--out DIR]` loads an HF checkpoint (the tiny model's too), runs the agent greedily
(temperature 0: `do_sample=False`), prints EM and F1 per dataset, one column per file in the order given, named by
the file's stem or by an explicit `NAME=FILE` entry (never guessed from the file name), and writes `results.json`,
`results.md` and one `trajectories/<dataset>.jsonl` per file (every response, query and retrieved document id).

Trajectories are scored by the trainer's own reward function (`stepsearch.rewards.score_rollout`, with the reward
section of `--config` or the defaults): the answer is the last `<answer>` block of the generated tokens only (a
retrieved document that holds an answer block is never read as the answer), SQuAD normalisation, max over aliases.
Also reported: searches per question, the fraction of responses with a valid answer format, information gain per
search and redundancy (the step reward's G^t and P^t, with the configured redundancy identity, averaged over
search rounds of questions that have golden docs), and EM/F1 per number of hops when records carry it.
`evaluate(...)` is the same in Python, for the trainer's before/after evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepsearch.rewards import TrajectoryReward, score_rollout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stepsearch.config import RewardConfig, RolloutConfig
    from stepsearch.data.records import QARecord
    from stepsearch.retrieval.base import Retriever
    from stepsearch.rollout.engine import Engine

@dataclass
class DatasetResult:
    name: str
    num_questions: int
    em: float
    f1: float
    searches_per_question: float
    valid_format_rate: float
    info_gain_per_search: float | None
    """Mean G^t over search rounds of questions with golden docs; None when no such round exists."""
    redundancy_per_search: float | None
    """Mean P^t over the same rounds."""
    per_hop: dict[int, dict[str, float]] = field(default_factory=dict)
    """hops -> {"n", "em", "f1"} for records that state their number of hops."""


@dataclass
class EvalResult:
    datasets: dict[str, DatasetResult]
    trajectories: dict[str, list[dict[str, Any]]]

    @property
    def average(self) -> dict[str, float]:
        """Unweighted mean over datasets (the paper's "Avg." column)."""
        if not self.datasets:
            return {"em": 0.0, "f1": 0.0}
        results = list(self.datasets.values())
        return {"em": sum(r.em for r in results) / len(results), "f1": sum(r.f1 for r in results) / len(results)}

    def ordered_names(self) -> list[str]:
        """Datasets in the order they were given (the command line's order of files)."""
        return list(self.datasets)

    def metrics(self) -> dict[str, float]:
        """Flat scalars for the trainer's metric log: eval/<dataset>/{em,f1,searches}, eval/avg/{em,f1}."""
        flat = {}
        for name, result in self.datasets.items():
            flat[f"eval/{name}/em"] = result.em
            flat[f"eval/{name}/f1"] = result.f1
            flat[f"eval/{name}/searches"] = result.searches_per_question
        flat["eval/avg/em"], flat["eval/avg/f1"] = self.average["em"], self.average["f1"]
        return flat

    def to_dict(self) -> dict[str, Any]:
        return {"datasets": {name: asdict(self.datasets[name]) for name in self.ordered_names()},
                "average": self.average}

    def markdown(self) -> str:
        """The paper's layout: one EM/F1 column pair per dataset, then the average; a detail table below."""
        names = self.ordered_names()
        header = "| metric | " + " | ".join(names) + " | Avg. |"
        rule = "|---|" + "---|" * (len(names) + 1)
        rows = [f"| {metric.upper()} | " + " | ".join(f"{100 * getattr(self.datasets[n], metric):.1f}" for n in names)
                + f" | {100 * self.average[metric]:.1f} |" for metric in ("em", "f1")]
        detail = ["", "| dataset | questions | searches/q | valid format | gain/search | redundancy/search |",
                  "|---|---|---|---|---|---|"]
        for name in names:
            r = self.datasets[name]
            detail.append(f"| {name} | {r.num_questions} | {r.searches_per_question:.2f} | {r.valid_format_rate:.2f} | "
                          f"{_maybe(r.info_gain_per_search)} | {_maybe(r.redundancy_per_search)} |")
        hops = ["", "| dataset | hops | questions | EM | F1 |", "|---|---|---|---|---|"]
        hop_rows = [f"| {n} | {h} | {int(v['n'])} | {100 * v['em']:.1f} | {100 * v['f1']:.1f} |"
                    for n in names for h, v in sorted(self.datasets[n].per_hop.items())]
        return "\n".join([header, rule, *rows, *detail, *(hops + hop_rows if hop_rows else [])]) + "\n"


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def evaluate(engine: "Engine", retriever: "Retriever", tokenizer: "PreTrainedTokenizerBase",
             records_by_name: Mapping[str, Sequence["QARecord"]], rollout_cfg: "RolloutConfig", topk: int,
             max_questions: int | None = None, *, batch_size: int = 64, max_query_chars: int = 512,
             progress: bool = True, reward_cfg: "RewardConfig | None" = None) -> EvalResult:
    """Greedy agent rollouts on the first `max_questions` records of each dataset, scored per dataset by
    `score_rollout` under `reward_cfg` (default: the built-in reward section)."""
    from stepsearch.config import RewardConfig
    from stepsearch.rollout.agent_loop import run_agent_loop

    reward_cfg = RewardConfig() if reward_cfg is None else reward_cfg
    datasets, trajectories = {}, {}
    for name, records in records_by_name.items():
        records = list(records)[:max_questions] if max_questions is not None else list(records)
        rows: list[dict[str, Any]] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(records), desc=f"eval {name}", unit="q", leave=False)
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = run_agent_loop(engine, retriever, tokenizer, chunk, rollout_cfg, topk=topk, greedy=True,
                                   samples_per_prompt=1, max_query_chars=max_query_chars,
                                   row_groups=rollout_cfg.row_groups)
            rewards = score_rollout(batch, chunk, reward_cfg)
            for row, reward in enumerate(rewards.trajectories):
                rows.append(_score(chunk[batch.record_indices[row]], batch, row, reward))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        datasets[name] = _summarise(name, rows)
        trajectories[name] = rows
    return EvalResult(datasets, trajectories)


def results_from_trajectories(trajectories: Mapping[str, list[dict[str, Any]]]) -> EvalResult:
    """An `EvalResult` from scored trajectories (`EvalResult.trajectories`), e.g. the shards of several ranks."""
    return EvalResult({name: _summarise(name, rows) for name, rows in trajectories.items()},
                      {name: list(rows) for name, rows in trajectories.items()})


def _score(record: "QARecord", batch: Any, row: int, reward: TrajectoryReward) -> dict[str, Any]:
    retrieved = batch.retrieved[row]
    scored = {"id": record.id, "question": record.question, "answers": list(record.answers), "hops": record.hops,
              "prediction": batch.answers[row], "em": reward.outcome.em, "f1": reward.outcome.f1,
              "valid_format": reward.outcome.valid_format, "num_searches": batch.num_searches[row],
              "queries": list(batch.queries[row]), "retrieved_ids": [[doc.id for doc in docs] for docs in retrieved],
              "finish_reason": batch.finish_reasons[row] if batch.finish_reasons else None,
              "response": batch.response_texts[row]}
    if reward.has_golden and any(reward.searched):
        scored["step_gains"] = [g for g, searched in zip(reward.gains, reward.searched) if searched]
        scored["step_penalties"] = [p for p, searched in zip(reward.penalties, reward.searched) if searched]
    return scored


def _summarise(name: str, rows: list[dict[str, Any]]) -> DatasetResult:
    count = len(rows)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    gains = [g for row in rows for g in row.get("step_gains", [])]
    penalties = [p for row in rows for p in row.get("step_penalties", [])]
    by_hops: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["hops"] is not None:
            by_hops[int(row["hops"])].append(row)
    per_hop = {hops: {"n": float(len(group)), "em": mean([r["em"] for r in group]),
                      "f1": mean([r["f1"] for r in group])}
               for hops, group in sorted(by_hops.items())}
    return DatasetResult(
        name=name, num_questions=count, em=mean([r["em"] for r in rows]), f1=mean([r["f1"] for r in rows]),
        searches_per_question=mean([r["num_searches"] for r in rows]),
        valid_format_rate=mean([float(r["valid_format"]) for r in rows]),
        info_gain_per_search=mean(gains) if gains else None,
        redundancy_per_search=mean(penalties) if penalties else None, per_hop=per_hop,
    )


def write_results(result: EvalResult, out_dir: str | Path) -> Path:
    """results.json, results.md and trajectories/<dataset>.jsonl under `out_dir`."""
    out = Path(out_dir)
    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    (out / "results.md").write_text(result.markdown(), encoding="utf-8")
    for name, rows in result.trajectories.items():
        with open(out / "trajectories" / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsearch eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory (model + tokenizer)")
    parser.add_argument("--data", required=True,
                        help="comma-separated QA files, each one dataset column named by its file stem, or NAME=FILE "
                             "to name it (e.g. HotpotQA=data/hotpot_dev.json)")
    parser.add_argument("--retriever", required=True,
                        help="retrieval server URL (http://…), an index directory, or a corpus .jsonl to index")
    parser.add_argument("--format", default="auto", help="data format of every file (default: detect)")
    parser.add_argument("--max-questions", type=int, default=None, help="first N questions of each file")
    parser.add_argument("--out", default="eval_out", help="output directory (default: eval_out)")
    parser.add_argument("--topk", type=int, default=3, help="documents per search (paper: 3)")
    parser.add_argument("--template", default="paper", choices=["paper", "released"])
    parser.add_argument("--max-turns", type=int, default=5)
    parser.add_argument("--max-response-tokens", type=int, default=2048)
    parser.add_argument("--engine", default="hf", choices=["hf", "sglang"])
    parser.add_argument("--sglang-url", default=None, help="use a running SGLang server instead of loading --model")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per rollout batch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--config", default=None,
                        help="YAML preset whose `reward` section scores the trajectories (default: built-in defaults)")
    return parser


def dataset_files(spec: str) -> list[tuple[str, Path]]:
    """`--data` -> [(column name, file)]: `NAME=FILE` names a column, a bare FILE is named by its stem."""
    named: list[tuple[str, Path]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        if not sep or Path(entry).exists():  # a file whose own name holds '=' is still a bare file
            name, path = Path(entry).stem, entry
        name = name.strip()
        if not name:
            raise ValueError(f"--data entry {entry!r} has an empty dataset name")
        if name in (n for n, _ in named):
            raise ValueError(f"--data names two datasets {name!r}; name them apart with NAME=FILE")
        named.append((name, Path(path.strip())))
    return named


def _retriever_from_arg(spec: str, out_dir: Path) -> "Retriever":
    from stepsearch.config import RetrieverConfig
    from stepsearch.retrieval.factory import make_retriever

    if spec.startswith(("http://", "https://")):
        return make_retriever(RetrieverConfig(url=spec))
    path = Path(spec)
    if path.is_dir():
        return make_retriever(RetrieverConfig(index_dir=str(path)))
    if path.is_file():
        return make_retriever(RetrieverConfig(), corpus_path=path, work_dir=out_dir)
    raise SystemExit(f"stepsearch eval: --retriever {spec!r} is neither a URL, an index directory nor a corpus file")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from stepsearch.config import ConfigError, RolloutConfig, load_config
    from stepsearch.data.loaders import DataFormatError, load_records
    from stepsearch.models.actor_critic import load_tokenizer
    from stepsearch.rollout.engine import make_engine

    try:
        reward_cfg = load_config(args.config).reward
    except ConfigError as exc:
        print(f"stepsearch eval: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    try:
        files = dataset_files(args.data)
    except ValueError as exc:
        print(f"stepsearch eval: {exc}", file=sys.stderr)
        return 2
    records_by_name: dict[str, list] = {}
    for name, path in files:
        try:
            records_by_name[name] = load_records(path, args.format).records
        except DataFormatError as exc:
            print(f"stepsearch eval: {exc}", file=sys.stderr)
            return 2
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"stepsearch eval: --model {model_dir} is not an HF checkpoint directory (no config.json)",
              file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = load_tokenizer(str(model_dir))  # a tiny checkpoint's tokenizer exactly as saved
    rollout_cfg = RolloutConfig(engine=args.engine, sglang_url=args.sglang_url, template=args.template,
                                max_turns=args.max_turns, max_response_tokens=args.max_response_tokens,
                                max_new_tokens_per_turn=min(256, args.max_response_tokens))
    model = None
    if args.engine == "hf":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    engine = make_engine(rollout_cfg, model, tokenizer, device, model_path=str(model_dir))
    retriever = _retriever_from_arg(args.retriever, out_dir)
    result = evaluate(engine, retriever, tokenizer, records_by_name, rollout_cfg, args.topk, args.max_questions,
                      batch_size=args.batch_size, reward_cfg=reward_cfg)
    write_results(result, out_dir)
    print(result.markdown())
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and {out_dir / 'trajectories'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
