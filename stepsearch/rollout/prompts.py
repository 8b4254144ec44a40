"""Prompt templates of the search agent, selected by `RolloutConfig.template`.

`paper`: the think/search/information/answer instruction of the StepSearch paper (Search-R1's wording family):
reason inside <think>, search with <search>query</search>, read <information>, answer inside <answer>.
`released`: the plan/observation style of the released training code: the model first plans the sub-questions,
then resolves them one search at a time, treating each <information> block as an observation. `compact`: the
paper's instruction in one sentence, for the embedded tiny model, which cannot read instructions and pays for
every prompt token in each forward pass (about 30 tokens instead of 120). All use the same tags, so the agent
loop, the segmenter and the rewards are template-independent.

When the tokenizer has a chat template, the instruction is the user turn and the generation prompt is appended;
otherwise the instruction text is the prompt as is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES = {
    "paper": (
        "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
        "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
        "<search> query </search>, and it will return the top searched results between <information> and "
        "</information>. You can search as many times as you want. If you find no further external knowledge "
        "needed, you can directly provide the answer inside <answer> and </answer> without detailed "
        "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
    ),
    "released": (
        "You are a research assistant that answers multi-hop questions with a search engine. First, inside "
        "<think> and </think>, make a plan: break the question into the sub-questions that must be answered in "
        "order. Then resolve the sub-questions one at a time: write one focused query as <search> query "
        "</search>; the search results come back as an observation between <information> and </information>. "
        "After each observation, reflect inside <think> and </think> on what you learned and what is still "
        "missing, and search again if needed. When every sub-question is resolved, give only the final answer, "
        "a short entity or phrase, inside <answer> and </answer>, for example <answer> Beijing </answer>.\n"
        "Question: {question}\n"
    ),
    "compact": (
        "Answer the question: think in <think> </think>, search with <search> query </search>, read the "
        "<information>, and answer in <answer> </answer>. Question: {question}\n"
    ),
}


def render_instruction(question: str, template: str) -> str:
    """The instruction text of `template` for `question` (before any chat template)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r} (expected one of {sorted(TEMPLATES)})")
    return TEMPLATES[template].format(question=question.strip())


def build_prompt_text(tokenizer: "PreTrainedTokenizerBase", question: str, template: str) -> str:
    instruction = render_instruction(question, template)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return instruction


def build_prompt_ids(tokenizer: "PreTrainedTokenizerBase", question: str, template: str) -> list[int]:
    """Token ids of the prompt, exactly as they are fed to the engine (the chat template already holds any BOS)."""
    return tokenizer.encode(build_prompt_text(tokenizer, question, template), add_special_tokens=False)
