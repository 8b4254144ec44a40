"""stepsearch.data: the record type, dataset loaders, the synthetic multi-hop world, and the search-key pipeline.

- `load_records(path, format="auto", skip_bad_rows=False) -> LoadResult(records, skipped, bad_rows)`
- `load_or_create_world(out_dir, seed, num_train, num_test) -> WorldFiles(root, corpus, train, test, meta)`
- `gold_trajectory(record, rng=None) -> GoldTrajectory(steps=[GoldStep(sub_question, query, doc, answer)],
  final_answer)` for supervised warm starts
- `run_pipeline(records, out_path, retriever, writer=None, n_queries=3, topk=3)` (see `stepsearch.data.pipeline`)
"""
from stepsearch.data.loaders import FORMATS, DataFormatError, LoadResult, load_records, to_stepsearch_row
from stepsearch.data.records import QARecord, SupportDoc
from stepsearch.data.synth import GoldStep, GoldTrajectory, WorldFiles, gold_trajectory, load_or_create_world

__all__ = [
    "FORMATS", "DataFormatError", "GoldStep", "GoldTrajectory", "LoadResult", "QARecord", "SupportDoc",
    "WorldFiles", "gold_trajectory", "load_or_create_world", "load_records", "to_stepsearch_row",
]
