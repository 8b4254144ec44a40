"""SGLangEngine's HTTP client against a loopback server speaking SGLang's native /generate contract (request fields
input_ids, sampling_params, return_logprob; response output_ids, meta_info.output_token_logprobs and finish_reason),
answering with the tiny model through HFEngine, plus /get_model_info and /update_weights_from_disk (JSON
{"success", "message"}, HTTP 400 on failure) for weight sync."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from stepsearch.config import ModelConfig
from stepsearch.models.tiny import build_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.rollout.engine import EngineError, HFEngine, SGLangEngine

TEXTS = [f"Report {i}: the bridge at Osk was built in {1800 + i}. <search>bridge {i}</search>" for i in range(60)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    tokenizer = train_tokenizer(TEXTS, vocab_size=400, out_dir=root / "served")
    model = build_tiny_model(ModelConfig(tiny_hidden_size=64, tiny_num_layers=1, tiny_num_heads=4,
                                         tiny_num_kv_heads=2, tiny_intermediate_size=96,
                                         tiny_copy_circuit=False), tokenizer)
    model.save_pretrained(root / "served")
    backend = HFEngine(model, tokenizer, "cpu")
    seen = {"requests": [], "loaded": [], "files": [], "refuse": None}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, code, payload):
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/get_model_info":  # SGLang has no /model_info route
                self._reply(404, {"detail": "Not Found"})
                return
            self._reply(200, {"model_path": str(root / "served"), "is_generation": True})

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/update_weights_from_disk":
                path = payload["model_path"]
                seen["loaded"].append(path)
                seen["files"].append(sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else [])
                ok = (Path(path) / "config.json").is_file() and seen["refuse"] is None
                message = "" if ok else seen["refuse"] or "no path"
                self._reply(200 if ok else 400, {"success": ok, "message": message})
                return
            seen["requests"].append(payload)
            params = payload["sampling_params"]
            # SGLang checks stop strings itself; the client re-applies the stop rule, so answer without them here
            generations = backend.generate(payload["input_ids"], max_new_tokens=params["max_new_tokens"],
                                           stop_strings=[], temperature=params["temperature"], top_p=params["top_p"],
                                           seed=params.get("sampling_seed"))
            self._reply(200, [{"text": "", "output_ids": g.token_ids,
                               "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in
                                                                       zip(g.logprobs, g.token_ids)],
                                             "finish_reason": {"type": "length", "length": len(g.token_ids)}}}
                              for g in generations])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tokenizer, backend, seen, model
    server.shutdown()
    server.server_close()


def test_generate_over_http_matches_the_local_engine_and_applies_the_stop_rule(served):
    url, tokenizer, backend, seen, model = served
    engine = SGLangEngine(tokenizer, url=url, timeout_s=30)
    prompts = [tokenizer.encode("Report 3: the bridge", add_special_tokens=False), tokenizer.encode("x")]
    free = backend.generate(prompts, max_new_tokens=10, stop_strings=[], temperature=0.0, top_p=1.0)
    stop = tokenizer.decode(free[0].token_ids[2:4])
    remote = engine.generate(prompts, max_new_tokens=10, stop_strings=[stop], temperature=0.0, top_p=1.0, seed=7)
    local = backend.generate(prompts, max_new_tokens=10, stop_strings=[stop], temperature=0.0, top_p=1.0)
    assert [g.token_ids for g in remote] == [g.token_ids for g in local]
    assert [g.finish_reason for g in remote] == [g.finish_reason for g in local]
    torch.testing.assert_close(torch.tensor(remote[0].logprobs), torch.tensor(local[0].logprobs))
    request = seen["requests"][-1]
    assert request["input_ids"] == prompts and request["return_logprob"] is True
    assert request["sampling_params"]["stop"] == [stop] and request["sampling_params"]["no_stop_trim"] is True
    sampling = request["sampling_params"]
    assert sampling["sampling_seed"] == 7 and sampling["skip_special_tokens"] is False


def test_weight_sync_over_http_streams_shards_into_a_new_directory_and_deletes_the_old_one(served, tmp_path):
    url, tokenizer, backend, seen, model = served
    engine = SGLangEngine(tokenizer, url=url, sync_dir=str(tmp_path / "sync"), bucket_bytes=20_000)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    engine.update_weights(state)
    first = Path(seen["loaded"][-1])
    assert first.parent == tmp_path / "sync" and first.is_dir()
    shards = [name for name in seen["files"][-1] if name.endswith(".safetensors")]
    assert len(shards) > 1  # streamed in buckets, not one full copy
    assert {"config.json", "model.safetensors.index.json"} <= set(seen["files"][-1])
    index = json.loads((first / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    staged = {}
    for shard in shards:
        staged.update(load_file(str(first / shard)))
    assert set(index["weight_map"]) == set(staged) and set(staged) <= set(model.state_dict())
    for name, tensor in staged.items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0)
    assert set(model.state_dict()) - set(staged) <= {"lm_head.weight"}  # tied to the embedding

    engine.update_weights(state)
    second = Path(seen["loaded"][-1])
    assert second != first and second.is_dir() and not first.exists()  # the old copy is deleted once replaced
    engine.update_weights(str(second))
    assert seen["loaded"][-1] == str(second)


def test_a_refused_weight_sync_over_http_stops_with_the_servers_message(served, tmp_path):
    url, tokenizer, backend, seen, model = served
    engine = SGLangEngine(tokenizer, url=url, sync_dir=str(tmp_path / "sync"))
    seen["refuse"] = "out of memory while loading"
    try:
        with pytest.raises(EngineError, match="out of memory while loading"):
            engine.update_weights(model.state_dict())
        with pytest.raises(EngineError, match="could not load weights from /bad"):
            engine.update_weights("/bad")
    finally:
        seen["refuse"] = None
    assert list((tmp_path / "sync").iterdir()) == []  # the refused copy is not left behind


def test_config_files_come_from_config_source_when_the_served_path_is_not_readable(served, tmp_path):
    url, tokenizer, backend, seen, model = served
    source = tmp_path / "actor"
    model.config.save_pretrained(source)
    (source / "model.safetensors").write_bytes(b"not copied")
    engine = SGLangEngine(tokenizer, url=url, sync_dir=str(tmp_path / "sync"), config_source=str(source))
    engine.update_weights(model.named_parameters())
    assert "config.json" in seen["files"][-1]
    assert (Path(seen["loaded"][-1]) / "model.safetensors").exists() is False
    assert engine.served_model_path().endswith("served")  # /get_model_info
    bad = SGLangEngine(tokenizer, url=url, sync_dir=str(tmp_path / "sync2"), config_source=str(tmp_path / "none"))
    with pytest.raises(EngineError, match="no config.json"):
        bad.update_weights(model.named_parameters())


def test_only_the_sync_rank_talks_to_the_server_but_every_rank_drains_the_gather(served, tmp_path):
    url, tokenizer, backend, seen, model = served
    engine = SGLangEngine(tokenizer, url=url, sync_dir=str(tmp_path / "sync"), is_sync_rank=False)
    loads = len(seen["loaded"])
    drained = []

    def gathering():
        for name, tensor in model.named_parameters():
            drained.append(name)
            yield name, tensor

    engine.update_weights(gathering())
    assert len(seen["loaded"]) == loads and not (tmp_path / "sync").exists()
    assert drained == [name for name, _ in model.named_parameters()]


def test_unreachable_server_is_a_clear_error(served):
    _, tokenizer, *_ = served
    engine = SGLangEngine(tokenizer, url="http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(EngineError, match="unreachable"):
        engine.generate([[1, 2]], max_new_tokens=2, stop_strings=[], temperature=0.0, top_p=1.0)
