"""SGLangEngine's HTTP client against a loopback server speaking SGLang's native /generate contract (request fields
input_ids, sampling_params, return_logprob; response output_ids, meta_info.output_token_logprobs and finish_reason),
answering with the tiny model through HFEngine, plus /model_info and /update_weights_from_disk for weight sync."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
                                         tiny_num_kv_heads=2, tiny_intermediate_size=96), tokenizer)
    model.save_pretrained(root / "served")
    backend = HFEngine(model, tokenizer, "cpu")
    seen = {"requests": [], "loaded": []}

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
            self._reply(200, {"model_path": str(root / "served")})

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/update_weights_from_disk":
                seen["loaded"].append(payload["model_path"])
                ok = (root / "served").exists() and payload["model_path"] != "/bad"
                self._reply(200 if ok else 400, {"success": ok, "message": "" if ok else "no such path"})
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
    assert request["sampling_params"]["sampling_seed"] == 7 and request["sampling_params"]["skip_special_tokens"] is False


def test_weight_sync_over_http_stages_safetensors_next_to_the_served_config(served, tmp_path):
    url, tokenizer, backend, seen, model = served
    engine = SGLangEngine(tokenizer, url=url, staging_dir=str(tmp_path / "stage"))
    engine.update_weights({f"module.{k}": v for k, v in model.state_dict().items()})
    assert seen["loaded"][-1] == str(tmp_path / "stage")
    from safetensors.torch import load_file

    staged = load_file(str(tmp_path / "stage" / "model.safetensors"))
    assert set(staged) == set(model.state_dict()) - {"lm_head.weight"}  # tied to the embedding, stored once
    assert (tmp_path / "stage" / "config.json").is_file()
    engine.update_weights(str(tmp_path / "stage"))
    assert seen["loaded"][-1] == str(tmp_path / "stage")
    with pytest.raises(EngineError, match="could not load weights from /bad"):
        engine.update_weights("/bad")


def test_unreachable_server_is_a_clear_error(served):
    _, tokenizer, *_ = served
    engine = SGLangEngine(tokenizer, url="http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(EngineError, match="unreachable"):
        engine.generate([[1, 2]], max_new_tokens=2, stop_strings=[], temperature=0.0, top_p=1.0)
