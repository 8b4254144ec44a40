"""Generation engines behind one interface: transformers `generate` (CPU default, tests) and SGLang (GPU clusters).

`Engine.generate` continues a batch of token-id prompts and returns, per prompt, the sampled token ids, their
log-probs and why generation ended. The agent loop only ever sees token ids: nothing is re-tokenized.

Stop strings (decided, identical for both engines): generation of a row ends at the token that *completes* the first
occurrence of any stop string in the generated text (the prompt is not searched). That token is kept, even when the
tokenizer fused the stop string with extra text (a token "</search>\\n" ends the turn and its "\\n" stays in the
ids); nothing after it is returned. The text of a token is `tokenizer.decode([id])`; a token that holds part of a
multi-byte character decodes to U+FFFD, which cannot be part of an ASCII stop string such as "</search>".

Log-probs (decided): `log_softmax(logits / temperature)` of the sampled token, before top-p truncation, so they
are the log-probs of the tempered policy the trainer's `old_logp` recomputes; temperature 0 (greedy) reports
`log_softmax(logits)`. SGLang reports its own log-probs of the sampled tokens (raw logits unless the server was
started to return processed ones); they are informational, the trainer recomputes `old_logp` with the actor.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

import torch

from stepsearch.rollout.types import Generation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stepsearch.config import RolloutConfig

NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
WeightsSource = Union[NamedTensors, str, os.PathLike]


class EngineError(RuntimeError):
    """The generation engine is missing, unreachable, or rejected a request."""


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_strings: list[str],
                 temperature: float, top_p: float, seed: int | None = None) -> list[Generation]:
        """One continuation per prompt (same order), stopping as described in the module docstring."""
        ...

    def update_weights(self, weights: WeightsSource) -> None:
        """Load new policy weights: named tensors (the actor's state dict) or a saved HF checkpoint directory."""
        ...


class TokenTexts:
    """Cached `decode([id])` per token id: the text the stop-string check sees."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase") -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __getitem__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._texts[token_id] = text
        return text


class StopScanner:
    """Incremental per-row stop-string detection over the generated text (tails only: O(1) per token)."""

    def __init__(self, stop_strings: list[str], token_texts: TokenTexts) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self._keep = max((len(s) for s in self.stop_strings), default=1) - 1
        self._token_texts = token_texts

    def new_state(self) -> list[str]:
        return [""]

    def push(self, state: list[str], token_id: int) -> bool:
        """Append one token to the row's tail; True when this token completes a stop string."""
        window = state[0] + self._token_texts[token_id]
        if any(stop in window for stop in self.stop_strings):
            return True
        state[0] = window[-self._keep:] if self._keep else ""
        return False

    def first_stop(self, token_ids: list[int]) -> int | None:
        """Index of the token completing the first stop string in `token_ids`, or None."""
        state = self.new_state()
        for index, token_id in enumerate(token_ids):
            if self.push(state, token_id):
                return index
        return None


# ----------------------------------------------------------------------------------------------------------------
# transformers engine


def _make_hf_hooks(temperature: float, top_p: float, eos_ids: set[int], scanner: StopScanner, batch_size: int):
    """The logits processor (tempering, top-p, log-prob recording) and stopping criterion of one generate call."""
    from transformers import LogitsProcessor, StoppingCriteria

    class SampleAndRecord(LogitsProcessor):
        """Applies temperature and top-p itself (HF's warpers are disabled) and records log-probs of the tempered
        distribution; the sampled token of step k is only known at step k+1 (or after generate returns)."""

        def __init__(self) -> None:
            self.pending_logp: torch.Tensor | None = None  # (B, V) log-probs of the step whose token is unknown
            self.token_logp: list[torch.Tensor] = []  # per step (B,)

        def collect(self, sampled: torch.Tensor) -> None:  # sampled: (B,)
            if self.pending_logp is not None:
                self.token_logp.append(self.pending_logp.gather(1, sampled[:, None])[:, 0])
                self.pending_logp = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.collect(input_ids[:, -1])
            scaled = scores.float() / temperature if temperature > 0 else scores.float()  # (B, V)
            self.pending_logp = torch.log_softmax(scaled, dim=-1)
            if temperature > 0 and top_p < 1.0:
                sorted_logp, order = torch.sort(self.pending_logp, dim=-1, descending=True)
                mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
                drop_sorted = mass_before >= top_p  # keeps the smallest prefix reaching top_p (>= 1 token)
                drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
                scaled = scaled.masked_fill(drop, float("-inf"))
            return scaled

    class StopOnStrings(StoppingCriteria):
        """Per-row stop: a completed stop string or an EOS token; remembers the step and reason of each row."""

        def __init__(self) -> None:
            self.states = [scanner.new_state() for _ in range(batch_size)]
            self.finished_at: list[int | None] = [None] * batch_size
            self.reasons: list[str] = ["length"] * batch_size
            self.step = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
            newest = input_ids[:, -1].tolist()
            for row, token_id in enumerate(newest):
                if self.finished_at[row] is not None:
                    continue
                if token_id in eos_ids:
                    self.finished_at[row], self.reasons[row] = self.step, "eos"
                elif scanner.push(self.states[row], token_id):
                    self.finished_at[row], self.reasons[row] = self.step, "stop"
            self.step += 1
            done = [at is not None for at in self.finished_at]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return SampleAndRecord(), StopOnStrings()


class HFEngine:
    """transformers `generate` with KV cache over left-padded batches.

    It wraps `model` itself (no copy): when `model` is the actor being trained, new weights are visible at once and
    `update_weights` is only needed for a separate copy. Prompts are sorted by length and generated in chunks of
    `max_batch_size` rows to limit padding and memory.
    """

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                 device: torch.device | str | None = None, max_batch_size: int = 64) -> None:
        if tokenizer.pad_token_id is None:
            raise EngineError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.token_texts = TokenTexts(tokenizer)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_strings: list[str],
                 temperature: float, top_p: float, seed: int | None = None) -> list[Generation]:
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("HFEngine.generate: empty prompt (every prompt needs at least one token)")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                for start in range(0, len(order), self.max_batch_size):
                    chunk = order[start:start + self.max_batch_size]
                    generations = self._generate_chunk([prompts[i] for i in chunk], max_new_tokens, stop_strings,
                                                       temperature, top_p)
                    for index, generation in zip(chunk, generations):
                        results[index] = generation
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], max_new_tokens: int, stop_strings: list[str],
                        temperature: float, top_p: float) -> list[Generation]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        batch_size, width = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((batch_size, width), pad, dtype=torch.long)  # (B, L) left-padded
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        scanner = StopScanner(stop_strings, self.token_texts)
        recorder, stopper = _make_hf_hooks(temperature, top_p, self.eos_ids, scanner, batch_size)
        # Every sampling knob is explicit and neutral so that a checkpoint's generation_config.json (Qwen2.5 ships
        # top_k=20, repetition_penalty=1.05) cannot change the distribution behind our back.
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if temperature > 0 else {}
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, repetition_penalty=1.0, num_beams=1,
            pad_token_id=pad, eos_token_id=sorted(self.eos_ids) or None, use_cache=True, **sampling,
        )
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            generation_config=generation_config, logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([stopper]),
        )  # (B, L + steps)
        recorder.collect(sequences[:, -1])
        new_tokens = sequences[:, width:].cpu()  # (B, steps)
        token_logp = torch.stack(recorder.token_logp, dim=1).float().cpu()  # (B, steps)
        generations = []
        for row in range(batch_size):
            finished_at = stopper.finished_at[row]
            length = new_tokens.shape[1] if finished_at is None else finished_at + 1
            generations.append(Generation(token_ids=new_tokens[row, :length].tolist(),
                                          logprobs=token_logp[row, :length].tolist(),
                                          finish_reason=stopper.reasons[row]))
        return generations

    def update_weights(self, weights: WeightsSource) -> None:
        """Copy named tensors (or a saved checkpoint directory) into the wrapped model; tensors that already are
        the model's own parameters are skipped. A leading "module." (DeepSpeed/DDP wrapper) is ignored."""
        if isinstance(weights, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            weights = AutoModelForCausalLM.from_pretrained(str(weights), dtype=torch.float32).state_dict()
        own = dict(self.model.state_dict(keep_vars=True))
        items = weights.items() if isinstance(weights, Mapping) else weights
        with torch.no_grad():
            for name, tensor in items:
                key = name.removeprefix("module.")
                if key not in own:
                    raise EngineError(f"update_weights: the rollout model has no parameter named {name!r}")
                target = own[key]
                if target.data_ptr() != tensor.data_ptr():
                    target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))


# ----------------------------------------------------------------------------------------------------------------
# SGLang engine


class SGLangEngine:
    """SGLang behind the `Engine` interface: an in-process `sglang.Engine` (`model_path`) or an HTTP server (`url`).

    Requests use SGLang's native API: `input_ids`, `sampling_params` {temperature, top_p, max_new_tokens, stop,
    no_stop_trim, skip_special_tokens, sampling_seed}, `return_logprob`; the output ids and
    `meta_info.output_token_logprobs` are truncated with the same stop rule as `HFEngine`. Weights: in-process,
    named tensors go through `update_weights_from_tensor`; over HTTP they are written as safetensors into
    `staging_dir` (next to the server model's config files) and loaded with `/update_weights_from_disk`, which
    also flushes the prefix cache. A directory is loaded with `update_weights_from_disk` in both modes.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", *, model_path: str | None = None, url: str | None = None,
                 mem_fraction: float = 0.4, timeout_s: float = 3600.0, staging_dir: str | None = None,
                 **engine_kwargs: Any) -> None:
        if (model_path is None) == (url is None):
            raise EngineError("SGLangEngine needs exactly one of model_path (in-process) or url (HTTP server)")
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.url = url.rstrip("/") if url else None
        self.timeout_s = timeout_s
        self.staging_dir = staging_dir
        self._engine = None
        if model_path is not None:
            try:
                import sglang
            except ImportError as exc:
                raise EngineError("rollout.engine=sglang needs SGLang: pip install 'stepsearch[sglang]' "
                                  "(or set rollout.sglang_url to a running SGLang server)") from exc
            self._engine = sglang.Engine(model_path=model_path, mem_fraction_static=mem_fraction, **engine_kwargs)

    def _post(self, route: str, payload: dict) -> Any:
        request = urllib.request.Request(f"{self.url}{route}", data=json.dumps(payload).encode("utf-8"),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", errors="replace")[:500]
            raise EngineError(f"SGLang server {self.url}{route} answered HTTP {exc.code}: {body}") from exc
        except urllib.error.URLError as exc:
            raise EngineError(f"SGLang server {self.url} is unreachable ({exc.reason}); is it running?") from exc

    def _get(self, route: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.url}{route}", timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.URLError as exc:
            raise EngineError(f"SGLang server {self.url}{route} failed: {exc}") from exc

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_strings: list[str],
                 temperature: float, top_p: float, seed: int | None = None) -> list[Generation]:
        if not prompts:
            return []
        sampling_params: dict[str, Any] = {
            "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0, "top_k": -1,
            "max_new_tokens": max_new_tokens, "stop": list(stop_strings), "no_stop_trim": True,
            "skip_special_tokens": False, "repetition_penalty": 1.0,
        }
        if seed is not None:
            sampling_params["sampling_seed"] = seed
        if self._engine is not None:
            outputs = self._engine.generate(input_ids=prompts, sampling_params=sampling_params, return_logprob=True)
        else:
            outputs = self._post("/generate", {"input_ids": prompts, "sampling_params": sampling_params,
                                               "return_logprob": True})
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(prompts):
            raise EngineError(f"SGLang returned {len(outputs)} outputs for {len(prompts)} prompts")
        scanner = StopScanner(stop_strings, self.token_texts)
        return [self._to_generation(output, scanner) for output in outputs]

    @staticmethod
    def _to_generation(output: dict, scanner: StopScanner) -> Generation:
        meta = output.get("meta_info", {})
        token_logprobs = meta.get("output_token_logprobs") or []
        token_ids = output.get("output_ids")
        if token_ids is None:  # older servers: ids only inside the log-prob triples (logprob, id, text)
            token_ids = [int(entry[1]) for entry in token_logprobs]
        logprobs = [float(entry[0]) if entry[0] is not None else 0.0 for entry in token_logprobs]
        if len(logprobs) != len(token_ids):
            raise EngineError(f"SGLang returned {len(token_ids)} ids but {len(logprobs)} log-probs")
        finish = meta.get("finish_reason") or {}
        reason = {"length": "length", "abort": "abort"}.get(finish.get("type"), "stop")
        if reason == "stop" and isinstance(finish.get("matched"), int):
            reason = "eos"
        if reason == "abort":
            raise EngineError(f"SGLang aborted a request: {finish.get('message')}")
        stop_at = scanner.first_stop(token_ids)
        if stop_at is not None:
            token_ids, logprobs, reason = token_ids[:stop_at + 1], logprobs[:stop_at + 1], "stop"
        return Generation(token_ids=list(token_ids), logprobs=logprobs, finish_reason=reason)

    def flush_cache(self) -> None:
        if self._engine is not None:
            self._engine.flush_cache()
        else:
            self._post("/flush_cache", {})

    def update_weights(self, weights: WeightsSource) -> None:
        if isinstance(weights, (str, os.PathLike)):
            self._update_from_disk(str(weights))
            return
        named = list(weights.items() if isinstance(weights, Mapping) else weights)
        named = [(name.removeprefix("module."), tensor) for name, tensor in named]
        if self._engine is not None:
            self._engine.update_weights_from_tensor(named_tensors=named, flush_cache=True)
            return
        self._update_from_disk(self._stage(named))

    def _update_from_disk(self, path: str) -> None:
        if self._engine is not None:
            result = self._engine.update_weights_from_disk(model_path=path)
            success, message = result[0], result[1]
        else:
            try:  # SGLang answers a failed load with HTTP 400 and {"success": false, "message": ...}
                answer = self._post("/update_weights_from_disk", {"model_path": path, "flush_cache": True})
            except EngineError as exc:
                raise EngineError(f"SGLang could not load weights from {path}: {exc}") from exc
            success, message = answer.get("success", False), answer.get("message", "")
        if not success:
            raise EngineError(f"SGLang could not load weights from {path}: {message}")

    def _stage(self, named: list[tuple[str, torch.Tensor]]) -> str:
        """Write the tensors as one safetensors file next to copies of the served model's config files."""
        from safetensors.torch import save_file

        staging = Path(self.staging_dir or tempfile.mkdtemp(prefix="stepsearch-sglang-weights-"))
        staging.mkdir(parents=True, exist_ok=True)
        served = Path(self._get("/model_info").get("model_path", ""))
        if not (served / "config.json").exists():
            raise EngineError(f"cannot stage weights for the SGLang server: its model path {served} is not readable "
                              "here; save a checkpoint on shared storage and pass its directory to update_weights")
        for config_file in served.iterdir():
            if config_file.is_file() and not config_file.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
                shutil.copy2(config_file, staging / config_file.name)
        # Tied parameters (lm_head = embed_tokens) share storage, which safetensors refuses; the loader re-ties
        # them from the first name, as HF checkpoints of tied models store it.
        tensors, storages = {}, set()
        for name, tensor in named:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            if storage not in storages:
                storages.add(storage)
                tensors[name] = tensor.detach().to("cpu").contiguous()
        save_file(tensors, str(staging / "model.safetensors"))
        return str(staging)


def make_engine(rollout_cfg: "RolloutConfig", model: "PreTrainedModel | None", tokenizer: "PreTrainedTokenizerBase",
                device: torch.device | str | None = None, *, model_path: str | None = None) -> Engine:
    """The engine `rollout_cfg.engine` names: `hf` wraps `model` on `device`; `sglang` connects to
    `rollout_cfg.sglang_url` or starts an in-process engine on `model_path`."""
    if rollout_cfg.engine == "hf":
        if model is None:
            raise EngineError("rollout.engine=hf needs the model to wrap")
        return HFEngine(model, tokenizer, device)
    if rollout_cfg.sglang_url:
        return SGLangEngine(tokenizer, url=rollout_cfg.sglang_url)
    if model_path is None:
        raise EngineError("rollout.engine=sglang without rollout.sglang_url starts SGLang in-process, which needs a "
                          "model directory (model.actor_path); the tiny in-code model has none: use rollout.engine=hf")
    return SGLangEngine(tokenizer, model_path=model_path, mem_fraction=rollout_cfg.sglang_mem_fraction)
