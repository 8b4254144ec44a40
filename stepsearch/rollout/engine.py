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

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
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

    def release_memory(self) -> None:
        """Give the GPU memory the engine holds back to the trainer until its next call (may do nothing)."""
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

    concurrent_calls = False  # one model, one generate at a time: the agent loop serialises its row groups' calls

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

    def release_memory(self) -> None:
        """Nothing to release: the wrapped model is the trainer's own (or its copy), and generate frees its cache."""

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

#: SGLang's memory-saver tags: the weights are resumed alone before a weight sync, the rest before generating.
WEIGHT_MEMORY_TAGS = ["weights"]
CACHE_MEMORY_TAGS = ["kv_cache", "cuda_graph"]


def bucketed(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of named tensors of at most `bucket_bytes` each (a larger tensor is a group of its own).

    It consumes `named` lazily, so a gathering iterator only ever holds one bucket of full tensors."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def reply_status(reply: Any) -> tuple[bool, str]:
    """(success, message) of an SGLang control reply: the Engine API's `(success, message)` tuple, a JSON object
    with `success`, or an output object with a `success` attribute; anything else counts as a failure."""
    if isinstance(reply, (tuple, list)) and len(reply) >= 2 and isinstance(reply[0], bool):
        return reply[0], str(reply[1])
    if isinstance(reply, Mapping) and isinstance(reply.get("success"), bool):
        return reply["success"], str(reply.get("message", ""))
    if isinstance(getattr(reply, "success", None), bool):
        return reply.success, str(getattr(reply, "message", ""))
    return False, f"unexpected reply {reply!r}"


@contextlib.contextmanager
def _without_torchelastic_agent_store() -> Iterator[None]:
    """SGLang's scheduler processes open their own process group with a TCP store on `nccl_port`. Under torchrun
    they inherit TORCHELASTIC_USE_AGENT_STORE=True, with which torch only connects to that port as a client of the
    launcher's store instead of hosting it, and the engine never comes up: the variable is hidden while they spawn."""
    saved = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def in_process_engine_args(rollout_cfg: "RolloutConfig", model_path: str, device: torch.device | str, *,
                           local_rank: int, seed: int) -> dict[str, Any]:
    """The `sglang.Engine` arguments of one rank's engine: one GPU (the rank's own, `base_gpu_id`), no tensor
    parallelism, ports of its own (`rollout.sglang_base_port` + 2 x local rank, NCCL on the next one) and the
    rank's seed. The DeepSpeed launcher shows every rank all GPUs, so without `base_gpu_id` every engine would
    land on GPU 0."""
    device = torch.device(device)
    if device.type != "cuda":
        raise EngineError(f"rollout.engine=sglang in-process runs on this rank's GPU, but the trainer's device is "
                          f"{device}; set trainer.device=cuda (or rollout.sglang_url to a running server)")
    port = rollout_cfg.sglang_base_port + 2 * local_rank
    for candidate in (port, port + 1):
        if not _port_is_free(candidate):
            raise EngineError(f"rollout.sglang_base_port={rollout_cfg.sglang_base_port}: port {candidate} (local rank "
                              f"{local_rank}) is in use; choose a base port with 2 x ranks-per-node free ports")
    return {
        "model_path": model_path,
        "base_gpu_id": device.index if device.index is not None else 0,
        "gpu_id_step": 1,
        "tp_size": 1,
        "dp_size": 1,
        "port": port,
        "nccl_port": port + 1,
        "random_seed": seed,
        "mem_fraction_static": rollout_cfg.sglang_mem_fraction,
        "enable_memory_saver": rollout_cfg.sglang_release_memory,
        "log_level": "error",
    }


def _distinct_storages(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Host copies of a bucket for safetensors, which refuses tensors sharing storage: of tied parameters
    (lm_head = embed_tokens) only the first name is kept, as HF checkpoints of tied models store them."""
    tensors, storages = {}, set()
    for name, tensor in bucket:
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage not in storages:
            storages.add(storage)
            tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def _collective_outcome(error: str | None) -> str | None:
    """Rank 0's weight-sync outcome on every rank (it also makes them wait for the server to load the weights)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _this_threads_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop SGLang releases without `Engine.loop` serve requests on: the building thread's own."""
    try:
        return asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:  # Python versions that no longer create one on demand
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop


class _LoopDriver:
    """Runs an in-process SGLang engine's asyncio loop on a thread of its own while generate calls are in flight,
    so that calls from several threads (the agent loop's row groups) become concurrent `async_generate` requests,
    which SGLang's scheduler batches as they arrive, each returning as soon as its own rows are done.

    SGLang serves every request on `Engine.loop`, where its first request starts the tokenizer manager's receive
    loop; its synchronous methods (weight updates, memory, cache) run that loop with `run_until_complete`. So the
    loop runs here only from the first call in flight to the last one, and is stopped in between, when those methods
    run on the caller's thread as usual."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._home_thread = threading.get_ident()  # the thread that built the engine
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._in_flight = 0
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def run(self, make_request: Callable[[], Awaitable[Any]], *, before_start: Callable[[], None]) -> Any:
        """The result of the coroutine `make_request()` run on the loop; `before_start` runs (on this thread, the
        loop stopped) when no other call is in flight."""
        with self._lock:
            if self._in_flight == 0:
                if self._loop.is_closed():
                    raise EngineError("the SGLang engine's event loop is closed: the engine was shut down")
                if threading.get_ident() != self._home_thread:
                    # SGLang releases before `Engine.loop` look the loop up per call (`asyncio.get_event_loop()`),
                    # which finds none on a thread other than the one that built the engine.
                    asyncio.set_event_loop(self._loop)
                before_start()
                self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-loop", daemon=True)
                self._thread.start()
            self._in_flight += 1
        try:
            future = asyncio.run_coroutine_threadsafe(make_request(), self._loop)
            try:
                return future.result(timeout=self._timeout_s)
            except TimeoutError as exc:
                future.cancel()
                raise EngineError(f"SGLang did not answer a generate request within {self._timeout_s:.0f} s") from exc
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._loop.call_soon_threadsafe(self._loop.stop)
                    self._thread.join()
                    self._thread = None


class SGLangEngine:
    """SGLang behind the `Engine` interface: an in-process `sglang.Engine` (`model_path`) or an HTTP server (`url`).

    Requests use SGLang's native API: `input_ids`, `sampling_params` {temperature, top_p, max_new_tokens, stop,
    no_stop_trim, skip_special_tokens, sampling_seed}, `return_logprob`; the output ids and
    `meta_info.output_token_logprobs` are truncated with the same stop rule as `HFEngine`.

    Concurrent calls (`concurrent_calls = True` in both modes): the agent loop's row groups call `generate` from
    their own threads at once, and each call returns when its own rows are done. Over HTTP each call is a request
    of its own; in-process each is an `async_generate` request on the engine's event loop, which runs on a thread of
    its own while calls are in flight (`_LoopDriver`). Either way SGLang's scheduler batches whatever is running.

    Weights (`update_weights`) are streamed in buckets of `bucket_bytes`, so a gathered ZeRO-3 actor never exists
    as a full copy: in-process, each bucket goes through `update_weights_from_tensor` (CUDA IPC, no host copy) and
    the prefix cache is flushed once at the end. Over HTTP one rank (`is_sync_rank`, rank 0) writes the buckets as
    safetensors shards plus an index into a new directory under `sync_dir` (which the server must be able to read),
    next to the config files of `config_source` (or of the served model when its path is readable here), and asks
    the server to load it with `/update_weights_from_disk`; the previous directory is deleted once the new one is
    loaded, and the outcome is shared with every rank. A directory is loaded with `update_weights_from_disk` in
    both modes. Any reply without success raises `EngineError`: a failed sync stops the run.

    Memory (in-process, `release_memory=True`; the engine must be started with `enable_memory_saver`):
    `release_memory` frees the engine's weights and KV cache for training; the next `update_weights` resumes the
    weights alone, the next `generate` the KV cache and CUDA graphs.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", *, model_path: str | None = None, url: str | None = None,
                 mem_fraction: float = 0.4, timeout_s: float = 3600.0, sync_dir: str | None = None,
                 config_source: str | None = None, bucket_bytes: int = 512 << 20, release_memory: bool = False,
                 is_sync_rank: bool = True, **engine_kwargs: Any) -> None:
        if (model_path is None) == (url is None):
            raise EngineError("SGLangEngine needs exactly one of model_path (in-process) or url (HTTP server)")
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.url = url.rstrip("/") if url else None
        self.timeout_s = timeout_s
        self.sync_dir = sync_dir
        self.config_source = config_source
        self.bucket_bytes = bucket_bytes
        self.release_memory_enabled = release_memory
        self.is_sync_rank = is_sync_rank
        self._released: set[str] = set()  # memory-saver tags currently released
        self._synced_dir: Path | None = None  # the last weights directory the HTTP server loaded
        self._sync_count = 0
        self._engine = None
        self._driver: _LoopDriver | None = None
        self.concurrent_calls = True
        if model_path is not None:
            try:
                import sglang
            except ImportError as exc:
                raise EngineError("rollout.engine=sglang needs SGLang: pip install 'stepsearch[sglang]' "
                                  "(or set rollout.sglang_url to a running SGLang server)") from exc
            if release_memory and not engine_kwargs.get("enable_memory_saver", False):
                raise EngineError("SGLangEngine(release_memory=True) needs the engine started with "
                                  "enable_memory_saver=True")
            with _without_torchelastic_agent_store():
                self._engine = sglang.Engine(model_path=model_path, mem_fraction_static=mem_fraction, **engine_kwargs)
            self._driver = _LoopDriver(getattr(self._engine, "loop", None) or _this_threads_event_loop(), timeout_s)

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

    def _check_no_generate_in_flight(self, what: str) -> None:
        """SGLang's synchronous methods run the event loop that in-flight generate calls hold."""
        if self._driver is not None and self._driver.running:
            raise EngineError(f"SGLangEngine.{what} was called while generate calls are in flight; it can only run "
                              "between rollouts")

    # -- memory ------------------------------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Free the in-process engine's GPU memory (weights, KV cache, CUDA graphs) until it is needed again."""
        if self._engine is None or not self.release_memory_enabled or self._released:
            return
        self._check_no_generate_in_flight("release_memory")
        self._engine.release_memory_occupation()
        self._released = set(WEIGHT_MEMORY_TAGS + CACHE_MEMORY_TAGS)

    def _resume(self, tags: list[str]) -> None:
        wanted = [tag for tag in tags if tag in self._released]
        if wanted:
            torch.cuda.empty_cache()  # the trainer's cached blocks would otherwise hold what SGLang takes back
            self._engine.resume_memory_occupation(tags=wanted)
            self._released.difference_update(wanted)

    # -- generation --------------------------------------------------------------------------------------------

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
            outputs = self._driver.run(
                lambda: self._engine.async_generate(input_ids=prompts, sampling_params=sampling_params,
                                                    return_logprob=True),
                before_start=lambda: self._resume(WEIGHT_MEMORY_TAGS + CACHE_MEMORY_TAGS))
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
            self._check_no_generate_in_flight("flush_cache")
            self._engine.flush_cache()
        else:
            self._post("/flush_cache", {})

    # -- weights -----------------------------------------------------------------------------------------------

    def update_weights(self, weights: WeightsSource) -> None:
        self._check_no_generate_in_flight("update_weights")
        if isinstance(weights, (str, os.PathLike)):
            if self._engine is not None:
                self._resume(WEIGHT_MEMORY_TAGS)
            self._update_from_disk(str(weights))
            return
        items = weights.items() if isinstance(weights, Mapping) else weights
        named = ((name.removeprefix("module."), tensor) for name, tensor in items)
        if self._engine is not None:
            self._update_in_process(named)
        else:
            self._update_over_http(named)

    def _update_in_process(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._resume(WEIGHT_MEMORY_TAGS)
        for bucket in bucketed(named, self.bucket_bytes):
            success, message = reply_status(self._engine.update_weights_from_tensor(named_tensors=bucket,
                                                                                    flush_cache=False))
            if not success:
                raise EngineError(f"SGLang rejected a weight update ({', '.join(n for n, _ in bucket[:3])}, ...): "
                                  f"{message}")
        self._engine.flush_cache()

    def _update_from_disk(self, path: str) -> None:
        if self._engine is not None:
            reply = self._engine.update_weights_from_disk(model_path=path)
        else:
            try:  # SGLang answers a failed load with HTTP 400 and {"success": false, "message": ...}
                reply = self._post("/update_weights_from_disk", {"model_path": path, "flush_cache": True})
            except EngineError as exc:
                raise EngineError(f"SGLang could not load weights from {path}: {exc}") from exc
        success, message = reply_status(reply)
        if not success:
            raise EngineError(f"SGLang could not load weights from {path}: {message}")

    def _update_over_http(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Rank 0 stages and loads; every rank drains `named` (gathering is collective) and learns the outcome."""
        error = None
        if self.is_sync_rank:
            error = self._stage_and_load(named)
        else:
            for _ in named:
                pass
        error = _collective_outcome(error)
        if error is not None:
            raise EngineError(error)

    def _stage_and_load(self, named: Iterator[tuple[str, torch.Tensor]]) -> str | None:
        """Write the weights into a new directory the server loads; returns the error, if any, after draining
        `named` to the end (the other ranks are still gathering with this one)."""
        from safetensors.torch import save_file

        root = Path(self.sync_dir) if self.sync_dir else Path(tempfile.gettempdir()) / "stepsearch-sglang-weights"
        self._sync_count += 1
        target = root / f"weights-{os.getpid()}-{self._sync_count:06d}"
        error = None
        weight_map: dict[str, str] = {}
        total = 0
        try:
            target.mkdir(parents=True, exist_ok=False)
            self._copy_config_files(target)
        except (OSError, EngineError) as exc:
            error = f"cannot stage weights for the SGLang server in {target}: {exc}"
        for index, bucket in enumerate(bucketed(named, self.bucket_bytes)):
            if error is not None:
                continue
            shard = f"model-{index + 1:05d}.safetensors"
            tensors = _distinct_storages(bucket)
            try:
                save_file(tensors, str(target / shard))
            except OSError as exc:
                error = f"cannot write {target / shard} (rollout.sglang_sync_dir): {exc}"
                continue
            weight_map.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if error is None:
            index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (target / "model.safetensors.index.json").write_text(json.dumps(index_json), encoding="utf-8")
            try:
                self._update_from_disk(str(target))
            except EngineError as exc:
                error = f"{exc} (rollout.sglang_sync_dir must be readable by the server)"
        if error is not None:
            shutil.rmtree(target, ignore_errors=True)
            return error
        if self._synced_dir is not None:
            shutil.rmtree(self._synced_dir, ignore_errors=True)
        self._synced_dir = target
        return None

    def _copy_config_files(self, target: Path) -> None:
        """Config, generation config and tokenizer files (no weights) of `config_source`, or of the served model."""
        source = Path(self.config_source) if self.config_source else Path(self.served_model_path())
        if not (source / "config.json").is_file():
            raise EngineError(f"no config.json in {source}: pass the actor's checkpoint directory as config_source "
                              "(the served model's path is not readable here)")
        for config_file in source.iterdir():
            if config_file.is_file() and not config_file.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
                shutil.copy2(config_file, target / config_file.name)

    def served_model_path(self) -> str:
        """The model path the HTTP server reports (`/get_model_info`)."""
        return str(self._get("/get_model_info").get("model_path", ""))


def make_engine(rollout_cfg: "RolloutConfig", model: "PreTrainedModel | None", tokenizer: "PreTrainedTokenizerBase",
                device: torch.device | str | None = None, *, model_path: str | None = None, rank: int = 0,
                local_rank: int = 0, seed: int = 0) -> Engine:
    """The engine `rollout_cfg.engine` names: `hf` wraps `model` on `device`; `sglang` connects to
    `rollout_cfg.sglang_url` (rank 0 syncs weights) or starts this rank's in-process engine on `model_path`, on
    `device` (`in_process_engine_args`)."""
    if rollout_cfg.engine == "hf":
        if model is None:
            raise EngineError("rollout.engine=hf needs the model to wrap")
        return HFEngine(model, tokenizer, device)
    bucket_bytes = rollout_cfg.sglang_sync_bucket_mb << 20
    if rollout_cfg.sglang_url:
        return SGLangEngine(tokenizer, url=rollout_cfg.sglang_url, sync_dir=rollout_cfg.sglang_sync_dir,
                            config_source=model_path, bucket_bytes=bucket_bytes, is_sync_rank=rank == 0)
    if model_path is None:
        raise EngineError("rollout.engine=sglang without rollout.sglang_url starts SGLang in-process, which needs a "
                          "model directory (model.actor_path); the tiny in-code model has none: use rollout.engine=hf")
    engine_args = in_process_engine_args(rollout_cfg, model_path, device if device is not None else "cuda",
                                         local_rank=local_rank, seed=seed)
    mem_fraction = engine_args.pop("mem_fraction_static")
    return SGLangEngine(tokenizer, mem_fraction=mem_fraction, bucket_bytes=bucket_bytes,
                        release_memory=rollout_cfg.sglang_release_memory, **engine_args)
