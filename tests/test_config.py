import pytest

from mmupt.config import ConfigError, load_settings


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_validate():
    settings = load_settings(environ={})
    assert settings.learner.clip_low == 0.2 and settings.learner.clip_high == 0.3
    assert settings.learner.dual_clip == 3.0 and settings.learner.kl_coef == 0.01


def test_unknown_key_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"learner\.learning_rate: unknown field"):
        load_settings(write(tmp_path, "learner:\n  learning_rate: 0.1\n"), environ={})


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.group_size"):
        load_settings(write(tmp_path, "rollout:\n  group_size: many\n"), environ={})


def test_out_of_range_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.top_p"):
        load_settings(write(tmp_path, "rollout:\n  top_p: 1.5\n"), environ={})


def test_env_overrides_nested_and_top_level(tmp_path):
    path = write(tmp_path, "learner:\n  lr: 0.5\n")
    settings = load_settings(path, environ={"MMUPT_LEARNER__LR": "1e-4", "MMUPT_REDIS_URL": "redis://h:1/0",
                                            "MMUPT_ROLLOUT__GROUP_SIZE": "10"})
    assert settings.learner.lr == 1e-4
    assert settings.redis_url == "redis://h:1/0"
    assert settings.rollout.group_size == 10


def test_unknown_env_variable_is_refused():
    with pytest.raises(ConfigError, match="MMUPT_LEARNER__LRR"):
        load_settings(environ={"MMUPT_LEARNER__LRR": "1"})


def test_tiny_config_file_loads():
    settings = load_settings("configs/tiny-cpu.yaml", environ={})
    assert settings.model.build_if_missing == "tiny-base" and settings.redis_url is None
    assert settings.data.synthetic_questions == ["color"] and settings.evaluation.enabled


def test_build_if_missing_and_question_types_are_checked():
    with pytest.raises(ConfigError, match="build_if_missing"):
        load_settings(environ={}, overrides={"model": {"build_if_missing": "huge"}})
    with pytest.raises(ConfigError, match="synthetic_questions"):
        load_settings(environ={}, overrides={"data": {"synthetic_questions": ["colour"]}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "a: [1,\n"), environ={})
