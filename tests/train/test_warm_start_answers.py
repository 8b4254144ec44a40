"""The warm start teaches a toy policy to answer questions it has never seen: demonstrations come from one region of
the synthetic world, the evaluation from another (no test question, and no entity a test question asks about,
appears in the demonstrations), so a correct answer means the policy searched, read and copied the answer.

A 2-hop world (`data.synth_hops=[2]`) with the preset-sized model: 250 warm-start steps take about 45 s on 2 idle
cores. Measured on 60 held-out questions, exact answers for trainer seeds 0 to 4: 9, 6, 11, 13 and 2 (F1 18%, 17%,
27%, 28%, 7%); the test asks for one. With 2-4 hop questions the same model needs about 400 steps to answer any.
Model selection (`trainer.warm_start_select_every`) scores the last step on 20 RL training questions and keeps it.

Unlike the embedded preset, the demonstrations here restate the question before searching it and never end in an
answer slip: after 250 steps, a policy taught to send the question without restating it first garbles it in its
first search and answered none of the 60 (seeds 0 and 1; the preset's 1,500 steps copy it), and the preset's slips
teach a wrong answer on purpose, for StePPO to correct.
"""

from __future__ import annotations

import json

from stepsearch.train import evaluate_stage
from stepsearch.trainer.build import build_run

HELD_OUT_TOY = [
    "model.tiny_hidden_size=128",
    "model.tiny_num_layers=2",
    "model.tiny_num_heads=4",
    "model.tiny_num_kv_heads=2",
    "model.tiny_intermediate_size=352",
    "model.tiny_copy_circuit=true",
    "model.tiny_vocab_size=1024",
    "data.synth_hops=[2]",
    "data.synth_num_test=60",
    "data.synth_num_warm_start=2000",
    "rollout.max_turns=4",
    "rollout.max_new_tokens_per_turn=48",
    "rollout.max_information_tokens=90",
    "rollout.max_response_tokens=480",
    "trainer.warm_start_steps=250",
    "trainer.warm_start_first_turn_steps=50",
    "trainer.warm_start_select_every=250",
    "trainer.warm_start_select_questions=20",
    "trainer.warm_start_restate_question=true",
    "trainer.warm_start_bridge_answer_prob=0",
    "trainer.eval_max_questions=60",
    "trainer.report=false",
    "deepspeed.enabled='off'",
]


def test_the_warm_started_toy_policy_answers_held_out_questions(tmp_path, toy_config):
    run = build_run(toy_config(tmp_path, *HELD_OUT_TOY))
    demonstrated = {record.question for record in run.data.warm_start}
    tested = {record.question for records in run.data.tests.values() for record in records}
    assert demonstrated and not demonstrated & tested
    selection = json.loads((run.ctx.paths.warm_start / "selection.json").read_text())
    assert [row["step"] for row in selection["history"]] == [250] and selection["kept_step"] == 250
    assert selection["questions"] == 20 and -1.0 <= selection["history"][0]["score"] <= 1.0
    metrics = evaluate_stage(run, "before")
    assert metrics["eval/test/em"] > 0, f"no held-out question answered exactly: {metrics}"
