"""Config: defaults < TOML < environment < flags, and refusals that name field, value, rule."""

from __future__ import annotations

import pytest

from trimtab.controller.config import ConfigError, load_config


def test_defaults_serve_loopback_with_the_measured_default_policies():
    cfg = load_config(env={})
    assert cfg.bind == "tcp://127.0.0.1:5555"
    assert cfg.metrics_port == 9108
    # Tuned-first (bench/results/tuned.md): the guard, and a range test that sweeps only
    # on evidence that the run's own LR is far off.
    assert [p.name for p in cfg.policies] == ["divergence_guard", "lr_range_test"]
    assert cfg.policies[1].config.get("when", "evidence") == "evidence"


def test_a_config_that_lists_its_policies_keeps_the_safety_net_unless_it_says_not(tmp_path):
    """A trial's config listed `lr_range_test` alone: no policy asked for a rollback, and a
    run whose weights went non-finite skipped every step under a live controller for good.
    The safety net (divergence_guard) runs first unless the config lists it (as it wants
    it: in shadow, say) or says `safety_net = false`."""
    cfg = tmp_path / "t.toml"
    cfg.write_text('[[policies]]\nname = "lr_range_test"\n')
    got = load_config(str(cfg), env={})
    assert [(p.name, p.shadow) for p in got.policies] == [
        ("divergence_guard", False), ("lr_range_test", False)]
    cfg.write_text('[[policies]]\nname = "plateau"\n[[policies]]\nname = "divergence_guard"'
                   '\nshadow = true\n')
    assert [(p.name, p.shadow) for p in load_config(str(cfg), env={}).policies] == [
        ("plateau", False), ("divergence_guard", True)]
    cfg.write_text('safety_net = false\n[[policies]]\nname = "lr_range_test"\n')
    assert [p.name for p in load_config(str(cfg), env={}).policies] == ["lr_range_test"]


def test_rollback_settings_load_and_are_validated(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[rollback]\nbudget = 2\nstable_window_steps = 60\n"
                    "[rollback.health]\nloss_z = 8\n")
    cfg = load_config(path, env={})
    assert (cfg.rollback.budget, cfg.rollback.stable_window_steps) == (2, 60)
    assert cfg.rollback.health.loss_z == 8.0 and cfg.rollback.base_cut == 0.5
    with pytest.raises(ConfigError, match=r"rollback\.base_cut = 1\.5: .*less than 1"):
        load_config(env={"TRIMTAB_ROLLBACK__BASE_CUT": "1.5"})
    with pytest.raises(ConfigError, match=r"rollback\.budget = 0: .*greater than or equal to 1"):
        load_config(env={"TRIMTAB_ROLLBACK__BUDGET": "0"})


def test_toml_then_env_then_overrides(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('journal = "from-file.db"\nmetrics_port = 1111\n'
                    '[governor.lr]\ncooldown_steps = 7\n')
    cfg = load_config(path, env={})
    got = (cfg.journal, cfg.metrics_port, cfg.governor.lr.cooldown_steps)
    assert got == ("from-file.db", 1111, 7)
    env = {"TRIMTAB_METRICS_PORT": "2222", "TRIMTAB_GOVERNOR__LR__COOLDOWN_STEPS": "9"}
    cfg = load_config(path, env=env)
    assert (cfg.metrics_port, cfg.governor.lr.cooldown_steps) == (2222, 9)
    cfg = load_config(path, env=env, overrides={"metrics_port": 3333})
    assert cfg.metrics_port == 3333
    assert cfg.journal == "from-file.db"


def test_config_path_from_environment(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("job_timeout_s = 5.5\n")
    assert load_config(env={"TRIMTAB_CONFIG": str(path)}).job_timeout_s == 5.5


def test_refusal_names_field_value_and_rule(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[governor.lr]\nmax_step_ratio = 0.5\n")
    with pytest.raises(ConfigError, match=r"governor\.lr\.max_step_ratio = 0\.5: .*greater than"):
        load_config(path, env={})


def test_unknown_field_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"metric_port = 1: Extra inputs are not permitted"):
        load_config(env={"TRIMTAB_METRIC_PORT": "1"})


def test_bad_env_value_refused_with_source():
    with pytest.raises(ConfigError, match=r"\(environment\):\n  metrics_port = 70000: .*less than"):
        load_config(env={"TRIMTAB_METRICS_PORT": "70000"})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_state_save_s_is_configured_and_checked():
    assert load_config(env={}).state_save_s == 5.0
    assert load_config(env={"TRIMTAB_STATE_SAVE_S": "0"}).state_save_s == 0
    with pytest.raises(ConfigError, match=r"state_save_s = -1: Input should be greater than or "
                                          r"equal to 0"):
        load_config(env={"TRIMTAB_STATE_SAVE_S": "-1"})
    with pytest.raises(ConfigError, match=r"state_save_s = 7200: .*less than or equal to 3600"):
        load_config(env={"TRIMTAB_STATE_SAVE_S": "7200"})


def test_a_misspelled_key_is_named_with_the_fields_allowed_there(tmp_path):
    """A trial: ``shaddow = true`` in a policy entry said only "Extra inputs are not
    permitted"; a policy's own config listed its fields, the controller's did not."""
    for text, where, allowed in [
        ('[[policies]]\nname = "plateau"\nshaddow = true\n', "policies.0.shaddow = True",
         "(allowed fields: config, jobs, name, shadow)"),
        ("[governor.lr]\nmax_rell = 3\n", "governor.lr.max_rell = 3", "max_rel, "),
        ('jurnal = "x"\n', "jurnal = 'x'", "journal, live_schedules"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        line = next(ln for ln in str(err.value).splitlines() if where in ln)
        assert "Extra inputs are not permitted (allowed fields: " in line and allowed in line
