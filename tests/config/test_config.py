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
