"""Config loading: defaults, presets with `base:` chains, command-line overrides, and errors that name file and key."""
import pytest

from stepsearch.config import Config, ConfigError, load_config, save_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_paper_semantics():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.reward.format_penalty == 0.0 and cfg.reward.key_aggregation == "max"
    assert cfg.reward.redundancy_identity == "doc_id"
    assert (cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.clip_ratio, cfg.ppo.kl_coef) == (1.0, 1.0, 0.2, 1e-3)


def test_yaml_overrides_and_cli_overrides_win(tmp_path):
    path = write(tmp_path, "p.yaml", "ppo:\n  actor_lr: 1e-6\n  mini_batch_size: 8\n  micro_batch_size: 4\n")
    cfg = load_config(path, ["ppo.actor_lr=2e-6", "trainer.total_steps=3", "data.test_paths=[a.jsonl, b.jsonl]"])
    assert cfg.ppo.actor_lr == 2e-6  # YAML 1.1 reads 1e-6 as a string; the float field converts it
    assert cfg.ppo.mini_batch_size == 8
    assert cfg.trainer.total_steps == 3
    assert cfg.data.test_paths == ["a.jsonl", "b.jsonl"]


def test_base_chain_is_resolved_relative_to_the_file(tmp_path):
    write(tmp_path, "base.yaml", "reward:\n  format_penalty: -1.0\n  step_weight: 1.6\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub", "child.yaml", "base: ../base.yaml\nreward:\n  step_weight: 2.0\n")
    cfg = load_config(child)
    assert cfg.reward.format_penalty == -1.0 and cfg.reward.step_weight == 2.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("ppo:\n  actor_lrr: 1.0\n", "unknown config key 'ppo.actor_lrr'"),
        ("nonsense:\n  a: 1\n", "unknown config key 'nonsense'"),
        ("ppo:\n  ppo_epochs: two\n", "ppo.ppo_epochs: expected an integer"),
        ("reward:\n  key_aggregation: mean\n", "reward.key_aggregation: 'mean' is not one of"),
        ("ppo:\n  mini_batch_size: 10\n  micro_batch_size: 4\n", "must be a multiple of micro_batch_size"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, text, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert "bad.yaml" in str(info.value)


def test_bad_command_line_override_is_named():
    with pytest.raises(ConfigError, match="command line: unknown config key 'trainer.totl_steps'"):
        load_config(None, ["trainer.totl_steps=3"])
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(None, ["trainer.total_steps"])


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["ppo.dual_clip=3.0", "retriever.url=http://127.0.0.1:9000", "trainer.run_name=x"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_bare_on_off_reach_on_off_fields():
    assert load_config(None, ["deepspeed.enabled=off"]).deepspeed.enabled == "off"
    assert load_config(None, ["deepspeed.enabled=on"]).deepspeed.enabled == "on"
    with pytest.raises(ConfigError, match="deepspeed.enabled: 'yes please' is not one of"):
        load_config(None, ["deepspeed.enabled=yes please"])


@pytest.mark.parametrize("override, needle", [
    ("ppo.micro_batch_size=0", "ppo.micro_batch_size must be >= 1, got 0"),
    ("ppo.mini_batch_size=0", "ppo.mini_batch_size must be >= 1, got 0"),
    ("ppo.rollout_batch_size=0", "ppo.rollout_batch_size must be >= 1, got 0"),
    ("model.tiny_num_heads=0", "model.tiny_num_heads must be >= 1, got 0"),
    ("model.tiny_num_kv_heads=0", "model.tiny_num_kv_heads must be >= 1, got 0"),
    ("model.tiny_num_layers=0", "model.tiny_num_layers must be >= 1, got 0"),
    ("model.tiny_hidden_size=12", "head size) must be even"),  # 12 / 4 heads = 3
    ("ppo.kl_coef=.nan", "ppo.kl_coef: expected a finite number, got nan"),
    ("ppo.actor_lr=.inf", "ppo.actor_lr: expected a finite number, got inf"),
    ("reward.format_penalty=-.inf", "reward.format_penalty: expected a finite number, got -inf"),
    ("ppo.gamma=nan", "ppo.gamma: expected a finite number"),
    ("ppo.grad_clip=-1", "ppo.grad_clip must be > 0, got -1.0"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef must be >= 0, got -0.1"),
    ("ppo.value_clip=0", "ppo.value_clip must be > 0"),
    ("ppo.entropy_coef=-1", "ppo.entropy_coef must be >= 0"),
    ("ppo.warmup_steps=-5", "ppo.warmup_steps must be >= 0"),
    ("rollout.max_information_tokens=0", "rollout.max_information_tokens must be >= 1"),
    ("rollout.sglang_mem_fraction=1.5", "rollout.sglang_mem_fraction must be in (0, 1)"),
    ("retriever.max_query_chars=0", "retriever.max_query_chars must be >= 1"),
    ("retriever.url=localhost:8000", "retriever.url must start with http:// or https://"),
    ("kernels.logprob_chunk_size=0", "kernels.logprob_chunk_size must be >= 1"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params needs zero_stage 3"),
    ("trainer.run_name=a/b", "trainer.run_name must be one directory name"),
    ("trainer.seed=-1", "trainer.seed must be >= 0"),
    ("trainer.warm_start_lr=0", "trainer.warm_start_lr must be > 0"),
    ("trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
    ("trainer.resume=' '", "trainer.resume must be 'auto', 'never' or a checkpoint path"),
    ("data.shuffle_seed=-3", "data.shuffle_seed must be >= 0"),
    ("data.synth_hops=[2,5]", "data.synth_hops must be a non-empty subset of [2, 3, 4], got [2, 5]"),
    ("data.synth_hops=[]", "data.synth_hops must be a non-empty subset of [2, 3, 4], got []"),
    ("model.actor_path=' '", "model.actor_path must be null or a non-empty string"),
])
def test_every_field_is_validated(override, needle):
    overrides = [override, "deepspeed.zero_stage=2"] if override.startswith("deepspeed.offload") else [override]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and str(info.value).startswith("defaults + command line: ")


@pytest.mark.parametrize("text, needle", [
    ("ppo:\n  kl_coef: 0.1\n  kl_coef: 0.2\n", "bad.yaml:3:3: invalid YAML: duplicate key 'kl_coef' (first at line 2)"),
    ("ppo:\n  kl_coef: 0.1\nreward: {}\nppo:\n  gamma: 1\n",
     "bad.yaml:4:1: invalid YAML: duplicate key 'ppo' (first at line 1)"),
    ("ppo: {kl_coef: .nan}\n", "ppo.kl_coef: expected a finite number, got nan"),
    ("ppo:\n  kl_coef: [1\n", "bad.yaml:3:1: invalid YAML:"),
    ("base: 3\n", "'base' must be the path of another preset"),
])
def test_yaml_problems_name_the_file_and_line(tmp_path, text, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_merge_key_is_not_a_duplicate(tmp_path):
    path = write(tmp_path, "anchors.yaml", "ppo: &p\n  kl_coef: 0.1\n  gamma: 0.9\nreward: {}\n"
                                           "x_unused: &q {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'x_unused'"):
        load_config(path)
    merged = write(tmp_path, "merged.yaml", "defaults: &d {kl_coef: 0.1, gamma: 0.9}\n")
    with pytest.raises(ConfigError, match="unknown config key 'defaults'"):
        load_config(merged)
    ok = write(tmp_path, "ok.yaml", "ppo:\n  <<: {kl_coef: 0.1, gamma: 0.9}\n  gamma: 0.5\n")
    cfg = load_config(ok)
    assert (cfg.ppo.kl_coef, cfg.ppo.gamma) == (0.1, 0.5)


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config path .* is a directory, not a YAML file"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("trainer:\n  run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml:2: not valid UTF-8 \(invalid continuation byte at byte 24\)"):
        load_config(latin)
    deep = write(tmp_path, "deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: invalid YAML: nested too deeply"):
        load_config(deep)
