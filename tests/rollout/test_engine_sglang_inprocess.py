"""In-process SGLang (`make_engine`, `SGLangEngine`) against a fake `sglang` module that records what the trainer
hands to `sglang.Engine` and calls on it: per-rank GPU placement, ports, seed and memory saver; the torchrun store
variable hidden while SGLang spawns; weight sync in buckets whose `(success, message)` replies are checked; memory
released for training and resumed in the order SGLang needs (weights before a sync, KV cache before generating);
generate calls from several threads in flight at once as `async_generate` requests on the engine's event loop, and
SGLang's synchronous methods, which run that loop themselves, only between them; both with `Engine.loop` and with
the releases before it, whose calls look their loop up on the calling thread."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
import types

import pytest
import torch

from stepsearch.config import RolloutConfig
from stepsearch.rollout.engine import EngineError, SGLangEngine, bucketed, make_engine, reply_status


class FakeTokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def decode(self, ids, **kwargs):
        return "".join(chr(65 + i % 26) for i in ids)


class FakeSGLangEngine:
    """Records constructor arguments, the environment at construction, and every call in order. Like SGLang, it
    serves requests on `self.loop`, and its synchronous methods run that loop with `run_until_complete` (which fails
    while another thread runs it). Like SGLang's tokenizer manager, it binds to the loop of its first request and
    fails on any other."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.agent_store_at_start = os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
        self.calls: list[tuple] = []
        self.update_reply = (True, "Succeeded to update parameter online.")
        self.loop = asyncio.new_event_loop()
        self.bound_loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold_until_in_flight = 1  # async_generate waits until this many requests are in flight
        self.release: asyncio.Event | None = None

    def _loop_of_this_call(self):
        return self.loop

    def _bind(self):
        running = asyncio.get_running_loop()
        self.bound_loop = self.bound_loop or running
        assert running is self.bound_loop, "a request on another event loop than the first one"

    def _sync(self, call, reply=None):
        async def served():
            self._bind()
            self.calls.append(call)
            return reply

        return self._loop_of_this_call().run_until_complete(served())

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        return self._sync(("update_weights_from_tensor", [name for name, _ in named_tensors], flush_cache),
                          self.update_reply)

    def update_weights_from_disk(self, model_path, load_format=None):
        return self._sync(("update_weights_from_disk", model_path),
                          (model_path != "/bad", "no such directory" if model_path == "/bad" else "ok", 0))

    def flush_cache(self):
        self._sync(("flush_cache",))

    def release_memory_occupation(self, tags=None):
        self._sync(("release_memory_occupation", tags))

    def resume_memory_occupation(self, tags=None):
        self._sync(("resume_memory_occupation", tags))

    async def async_generate(self, input_ids, sampling_params, return_logprob):
        self._bind()
        self.calls.append(("async_generate", len(input_ids)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.release is None:
            self.release = asyncio.Event()
        if self.in_flight >= self.hold_until_in_flight:
            self.release.set()
        try:
            await asyncio.wait_for(self.release.wait(), timeout=10)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.release = None
        return [{"output_ids": [7, 8], "meta_info": {"output_token_logprobs": [[-0.5, 7, None], [-0.25, 8, None]],
                                                     "finish_reason": {"type": "length"}}} for _ in input_ids]


class FakeLegacySGLangEngine(FakeSGLangEngine):
    """SGLang releases before `Engine.loop`: every call looks its loop up with `asyncio.get_event_loop()`, which
    finds none on a thread other than the one that built the engine, unless one was set there."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.loop

    def _loop_of_this_call(self):
        return asyncio.get_event_loop()


@pytest.fixture(params=["engine_loop", "legacy"])
def fake_sglang(monkeypatch, request):
    module = types.ModuleType("sglang")
    module.Engine = FakeSGLangEngine if request.param == "engine_loop" else FakeLegacySGLangEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    try:
        previous_loop = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:  # none set: an earlier `asyncio.run` in this thread unset it
        previous_loop = None
    home_loop = asyncio.new_event_loop()  # this thread's loop while the test runs (legacy engines serve on it)
    asyncio.set_event_loop(home_loop)
    yield module
    asyncio.set_event_loop(previous_loop)
    home_loop.close()


def free_base_port(count: int = 4) -> int:
    """A port p such that p .. p + count - 1 are free now."""
    for base in range(41000 + os.getpid() % 2000 * 4, 60000, 8):
        sockets = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no free ports")


def test_each_rank_gets_its_own_gpu_ports_and_seed(fake_sglang):
    base = free_base_port()
    cfg = RolloutConfig(engine="sglang", sglang_base_port=base, sglang_mem_fraction=0.55)
    engines = [make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", local_rank), model_path="/models/q",
                           rank=8 + local_rank, local_rank=local_rank, seed=100 + 8 + local_rank)
               for local_rank in (0, 1)]
    args = [engine._engine.kwargs for engine in engines]
    assert [a["base_gpu_id"] for a in args] == [0, 1]  # not GPU 0 for every rank
    assert [(a["port"], a["nccl_port"]) for a in args] == [(base, base + 1), (base + 2, base + 3)]
    assert [a["random_seed"] for a in args] == [108, 109]
    for a in args:
        assert a["model_path"] == "/models/q" and a["tp_size"] == 1 and a["dp_size"] == 1
        assert a["mem_fraction_static"] == 0.55 and a["enable_memory_saver"] is True


def test_the_torchrun_agent_store_variable_is_hidden_only_while_sglang_starts(fake_sglang, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    cfg = RolloutConfig(engine="sglang", sglang_base_port=free_base_port())
    engine = make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", 0), model_path="/m")
    assert engine._engine.agent_store_at_start is None
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"


def test_busy_ports_and_a_cpu_device_are_clear_errors(fake_sglang):
    base = free_base_port()
    cfg = RolloutConfig(engine="sglang", sglang_base_port=base)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 3))
        busy.listen()
        with pytest.raises(EngineError, match=rf"rollout.sglang_base_port={base}: port {base + 3} \(local rank 1\)"):
            make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", 1), model_path="/m", local_rank=1)
    with pytest.raises(EngineError, match="trainer.device=cuda"):
        make_engine(cfg, None, FakeTokenizer(), "cpu", model_path="/m")


def test_weights_sync_in_buckets_and_a_refusal_stops_the_run(fake_sglang):
    cfg = RolloutConfig(engine="sglang", sglang_base_port=free_base_port(), sglang_sync_bucket_mb=1)
    engine = make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", 0), model_path="/m")
    fake = engine._engine
    tensors = [(f"module.layer{i}.weight", torch.zeros(256, 256)) for i in range(9)]  # 256 KiB each
    sent_before = []  # buckets already handed to SGLang when each tensor is gathered

    def gathering():  # a gather that yields copies; the engine must not hold them all
        for name, tensor in tensors:
            sent_before.append(sum(call[0] == "update_weights_from_tensor" for call in fake.calls))
            yield name, tensor.clone()

    engine.update_weights(gathering())
    updates = [call for call in fake.calls if call[0] == "update_weights_from_tensor"]
    assert [len(call[1]) for call in updates] == [4, 4, 1]  # 1 MiB buckets
    assert updates[0][1][0] == "layer0.weight" and all(call[2] is False for call in updates)
    assert sent_before == [0, 0, 0, 0, 0, 1, 1, 1, 1]  # streamed: bucket 1 left before tensor 5 was gathered
    assert fake.calls[-1] == ("flush_cache",)

    fake.update_reply = (False, "Failed to update weights: shape mismatch")
    with pytest.raises(EngineError, match="shape mismatch"):
        engine.update_weights(tensors)
    fake.update_reply = None
    with pytest.raises(EngineError, match="unexpected reply None"):
        engine.update_weights(tensors)
    with pytest.raises(EngineError, match="no such directory"):
        engine.update_weights("/bad")


def test_memory_is_released_for_training_and_resumed_weights_first(fake_sglang, monkeypatch):
    cfg = RolloutConfig(engine="sglang", sglang_base_port=free_base_port())
    engine = make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", 0), model_path="/m")
    fake = engine._engine
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: fake.calls.append(("empty_cache",)))
    engine.generate([[3, 4]], max_new_tokens=2, stop_strings=[], temperature=1.0, top_p=1.0)
    assert [call[0] for call in fake.calls] == ["async_generate"]  # nothing to resume before the first release
    engine.release_memory()
    engine.release_memory()  # already released: not twice
    engine.update_weights([("w", torch.zeros(2))])
    out = engine.generate([[3, 4]], max_new_tokens=2, stop_strings=[], temperature=1.0, top_p=1.0)
    assert [call[:2] if call[0] != "update_weights_from_tensor" else call[0] for call in fake.calls[1:]] == [
        ("release_memory_occupation", None),
        ("empty_cache",),
        ("resume_memory_occupation", ["weights"]),
        "update_weights_from_tensor",
        ("flush_cache",),
        ("empty_cache",),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),
        ("async_generate", 1),
    ]
    assert out[0].token_ids == [7, 8] and out[0].logprobs == [-0.5, -0.25]

    kept = make_engine(RolloutConfig(engine="sglang", sglang_base_port=free_base_port(), sglang_release_memory=False),
                       None, FakeTokenizer(), torch.device("cuda", 0), model_path="/m")
    kept.release_memory()
    assert kept._engine.kwargs["enable_memory_saver"] is False and kept._engine.calls == []
    with pytest.raises(EngineError, match="enable_memory_saver"):
        SGLangEngine(FakeTokenizer(), model_path="/m", release_memory=True)


def test_bucketing_and_reply_parsing():
    tensors = [(str(i), torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5])]  # fp32: 40, 40, 120, 20 bytes
    assert [[name for name, _ in bucket] for bucket in bucketed(tensors, 80)] == [["0", "1"], ["2"], ["3"]]
    assert reply_status((True, "ok")) == (True, "ok")
    assert reply_status((False, "bad", 3)) == (False, "bad")
    assert reply_status({"success": False, "message": "nope"}) == (False, "nope")
    assert reply_status(types.SimpleNamespace(success=True, message="")) == (True, "")
    assert reply_status("weird")[0] is False


def test_generate_calls_from_several_threads_are_in_flight_at_once(fake_sglang):
    cfg = RolloutConfig(engine="sglang", sglang_base_port=free_base_port())
    engine = make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", 0), model_path="/m")
    fake = engine._engine
    assert engine.concurrent_calls
    fake.hold_until_in_flight = 4  # a call served alone would wait 10 s and fail

    def rollout_in_threads():  # as the agent loop's row groups call
        results = [None] * 4

        def call(index):
            results[index] = engine.generate([[3, 4]] * (index + 1), max_new_tokens=2, stop_strings=[],
                                             temperature=1.0, top_p=1.0)

        threads = [threading.Thread(target=call, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert fake.max_in_flight == 4
        assert [len(result) for result in results] == [1, 2, 3, 4]
        assert all(g.token_ids == [7, 8] for result in results for g in result)
        assert not fake.bound_loop.is_running() and not engine._driver.running

    rollout_in_threads()
    # between rollouts the trainer's synchronous calls run the loop on its own thread
    engine.release_memory()
    engine.update_weights([("w", torch.zeros(2))])
    engine.flush_cache()
    rollout_in_threads()  # the first call to come resumes the KV cache, on its own thread
    names_only = ("update_weights_from_tensor", "async_generate")
    assert [call[0] if call[0] in names_only else call[:2] for call in fake.calls] == [
        *["async_generate"] * 4,
        ("release_memory_occupation", None),
        ("resume_memory_occupation", ["weights"]),
        "update_weights_from_tensor",
        ("flush_cache",),
        ("flush_cache",),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),  # before the loop thread starts
        *["async_generate"] * 4,
    ]


def test_synchronous_calls_during_a_generate_and_failed_requests_are_clear_errors(fake_sglang):
    cfg = RolloutConfig(engine="sglang", sglang_base_port=free_base_port(), sglang_release_memory=False)
    engine = make_engine(cfg, None, FakeTokenizer(), torch.device("cuda", 0), model_path="/m")
    fake = engine._engine
    fake.hold_until_in_flight = 2
    worker = threading.Thread(target=engine.generate, args=([[3]],),
                              kwargs=dict(max_new_tokens=2, stop_strings=[], temperature=1.0, top_p=1.0))
    worker.start()
    deadline = time.monotonic() + 10
    while not fake.in_flight:
        assert time.monotonic() < deadline, "the first generate never reached SGLang"
        time.sleep(0.001)
    with pytest.raises(EngineError, match="update_weights was called while generate calls are in flight"):
        engine.update_weights([("w", torch.zeros(2))])
    engine.generate([[5]], max_new_tokens=2, stop_strings=[], temperature=1.0, top_p=1.0)  # the second one frees both
    worker.join()

    async def broken(**kwargs):
        raise RuntimeError("scheduler died")

    fake.async_generate = broken
    with pytest.raises(RuntimeError, match="scheduler died"):
        engine.generate([[3]], max_new_tokens=2, stop_strings=[], temperature=1.0, top_p=1.0)
    assert not engine._driver.running
    engine.flush_cache()  # the loop is free again after a failed request
    fake.bound_loop.close()  # as SGLang's shutdown leaves it
    with pytest.raises(EngineError, match="event loop is closed"):
        engine.generate([[3]], max_new_tokens=2, stop_strings=[], temperature=1.0, top_p=1.0)
