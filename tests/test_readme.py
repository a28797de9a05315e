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
