"""The README's examples are ones that work."""

from __future__ import annotations

import re
from pathlib import Path

from trimtab.controller.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_example_is_accepted(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its config example"
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.toml"
        path.write_text(block)
        cfg = load_config(path, env={})
        if "[retention]" in block and "[[policies]]" not in block:
            # The retention section says it shows the defaults: it must.
            from trimtab.controller.retention import RetentionConfig

            assert cfg.retention == RetentionConfig()
            continue
        names = [p.name for p in cfg.policies]
        assert names[:2] == ["divergence_guard", "plateau"], names
        for spec in cfg.policies[2:]:  # a third-party policy: allowed, and in shadow mode
            assert spec.shadow and spec.name in cfg.allow_plugins


def test_readme_set_up_commands_are_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    install = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]'"
    test = ".venv/bin/python -m pytest"
    assert install in text and test in text
    assert install in ci and test in ci


def test_the_adapter_guides_config_examples_are_accepted(tmp_path):
    """Every TOML block in docs/adapters.md loads (the GAN's per-job policy set: the range
    test in shadow for the GAN's jobs, live for every other job)."""
    checked = rl_blocks = 0
    for page in [README.parent / "docs" / "adapters.md"]:
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)):
            path = tmp_path / f"{page.stem}{i}.toml"
            path.write_text(block)
            cfg = load_config(path, env={})
            checked += 1
            if page.name == "adapters.md" and "gan-*" in block:
                (shadow,) = [p for p in cfg.policies if p.name == "lr_range_test" and p.shadow]
                live = [p for p in cfg.policies if p.name == "lr_range_test" and not p.shadow]
                assert shadow.applies_to("gan-G") and live and live[0].applies_to("char-lm")
            if page.name == "adapters.md" and "[rollback.health]" in block:
                rl_blocks += 1
                # The RL controller: the safety net without the loss-trend judgements that
                # misread a policy-gradient loss (no range test, no climb verdicts).
                assert [p.name for p in cfg.policies] == ["divergence_guard"]
                assert cfg.rollback.health.climb_t >= 1e9
    assert checked
    assert rl_blocks == 1, "docs/adapters.md lost its RL controller config"
