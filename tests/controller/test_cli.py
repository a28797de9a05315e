"""The ``trimtab`` command: refusals at start, and reading a journal."""

from __future__ import annotations

import subprocess
import sys

from trimtab.controller.journal import Journal


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimtab.controller", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_serve_refuses_a_bad_config_naming_field_value_and_rule(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[governor.lr]\nmax_step_ratio = 0.5\n")
    out = run("serve", "--config", str(cfg), "--journal", str(tmp_path / "j.db"))
    assert out.returncode == 2
    assert "governor.lr.max_step_ratio = 0.5" in out.stderr
    assert "greater than or equal to 1" in out.stderr


def test_serve_refuses_an_unknown_policy_naming_it(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[policies]]\nname = "no_such_policy"\n')
    out = run("serve", "--config", str(cfg), "--journal", str(tmp_path / "j.db"),
              "--metrics-port", "0", "--bind", "tcp://127.0.0.1:0")
    assert out.returncode == 2
    assert "no_such_policy" in out.stderr


def test_serve_says_a_typod_policy_is_not_found_and_suggests_the_name(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[policies]]\nname = "platau"\n')
    out = run("serve", "--config", str(cfg), "--journal", str(tmp_path / "j.db"),
              "--metrics-port", "0", "--bind", "tcp://127.0.0.1:0")
    assert out.returncode == 2
    assert "trimtab serve: cannot start: policy 'platau' not found: no entry point" in out.stderr
    assert "(known: adaptive_clip, " in out.stderr and ", plateau, " in out.stderr
    assert out.stderr.rstrip().endswith("did you mean 'plateau'?")
    assert "allow_plugins" not in out.stderr  # not a permission problem: no such policy


def test_serve_refuses_a_bad_flag_value(tmp_path):
    out = run("serve", "--bind", "http://nope", "--journal", str(tmp_path / "j.db"))
    assert out.returncode == 2
    assert "bind = 'http://nope'" in out.stderr


def test_decisions_prints_a_command_and_hides_its_ack_that_says_nothing_new(tmp_path):
    path = str(tmp_path / "j.db")
    j = Journal(path)
    j.append("demo", "report", step=10, seq=1, data={})
    j.append("demo", "command", step=10, seq=1, data={"knobs": {"momentum": 0.8}})
    j.append("demo", "ack", step=12, seq=1, data={"knobs": {"momentum": 0.8}})
    j.append("demo", "command", step=20, seq=2, data={"knobs": {"momentum": 0.7}})
    j.append("demo", "ack", step=22, seq=2, data={"knobs": {"momentum": 0.75}})
    j.close()
    out = run("decisions", "--journal", path, "--job", "demo")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["time", "step", "kind", "policy", "knob", "from", "->", "to",
                              "why"]
    assert [r.split()[1:] for r in rows] == [
        ["10", "command", "momentum", "0.8"],
        ["20", "command", "momentum", "0.7"],
        ["22", "ack", "#2", "differs", "momentum", "0.7", "asked,", "0.75", "applied"],
    ]
    # Asked for by name, every ack shows.
    out = run("decisions", "--journal", path, "--job", "demo", "--kind", "ack")
    assert out.returncode == 0, out.stderr
    assert [r.split()[1:4] for r in out.stdout.splitlines()[1:]] == [
        ["12", "ack", "#1"], ["22", "ack", "#2"]]


def test_an_ack_of_a_live_schedule_is_not_read_as_differing(tmp_path):
    """A DDP trial: during a sweep the ack read "lr x0.984 asked, x1.19 applied", like an
    error; the command put the lr on a live schedule, which the client evaluates at the step
    it applies it (a report later under DDP). Only a knob set to a value differs."""
    path = str(tmp_path / "j.db")
    j = Journal(path)
    j.append("demo", "command", step=10, seq=1,
             data={"scale": {"lr": 0.984}, "knobs": {"momentum": 0.8}, "live": ["lr"]})
    j.append("demo", "ack", step=15, seq=1, data={"scale": {"lr": 1.19},
                                                  "knobs": {"momentum": 0.8}})
    j.append("demo", "command", step=20, seq=2, data={"scale": {"lr": 0.5}, "live": []})
    j.append("demo", "ack", step=25, seq=2, data={"scale": {"lr": 0.6}})
    j.close()
    out = run("decisions", "--journal", path, "--job", "demo")
    assert out.returncode == 0, out.stderr
    acks = [r.split()[1:4] for r in out.stdout.splitlines()[1:] if " ack " in r]
    assert acks == [["25", "ack", "#2"]]  # the plain value that differs, only
    out = run("decisions", "--journal", path, "--job", "demo", "--kind", "ack")
    first = next(r for r in out.stdout.splitlines() if " #1 " in r)
    assert "live schedule" in first and "differs" not in first


def test_policies_lists_the_built_ins():
    out = run("policies")
    assert out.returncode == 0
    assert "plateau:" in out.stdout and "spike_guard:" in out.stdout


def _installed(site, entries: dict[str, str], modules: dict[str, str]) -> dict:
    """An environment in which ``site`` holds an installed distribution (its dist-info,
    as pip writes it) with these trimtab.policies entry points and modules."""
    info = site / "acme_policies-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-policies\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[trimtab.policies]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)
    import os

    return {**os.environ, "PYTHONPATH": str(site)}


IMPOSTOR = """
import pathlib, os
pathlib.Path(os.environ["MARK"]).write_text("imported")
from trimtab.controller.policy import Policy
class Impostor(Policy):
    name = "divergence_guard"
    def propose(self, view):
        return []
"""


def test_a_plugin_named_as_a_built_in_never_takes_its_place(tmp_path):
    """An installed package whose entry point is named ``divergence_guard``: the built-in
    is the one listed and loaded, even with every plugin allowed, and the other is shown as
    ignored without being imported."""
    env = _installed(tmp_path / "site", {"divergence_guard": "acme_guard:Impostor"},
                     {"acme_guard": IMPOSTOR})
    env["MARK"] = str(tmp_path / "imported")
    cfg = tmp_path / "all.toml"
    cfg.write_text('allow_plugins = ["*"]\n[[policies]]\nname = "divergence_guard"\n')
    out = run("policies", "--config", str(cfg), env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("divergence_guard: trimtab.policies.divergence_guard.")
               for line in lines), out.stdout
    assert ("divergence_guard: acme_guard:Impostor [ignored: the name is "
            "trimtab.policies.divergence_guard:DivergenceGuard's]") in lines
    assert not (tmp_path / "imported").exists()
    # The controller loads the built-in (and says what it ignored).
    check = ("from trimtab.controller.config import load_config; "
             "from trimtab.controller.handler import build_policies; "
             f"print(type(build_policies(load_config({str(cfg)!r}))[0][1]).__module__)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.stdout.strip() == "trimtab.policies.divergence_guard", out.stderr
    assert "policy entry point divergence_guard = 'acme_guard:Impostor' is ignored" in out.stderr
    assert not (tmp_path / "imported").exists()


def test_policies_does_not_import_a_plugin_the_config_does_not_allow(tmp_path):
    env = _installed(tmp_path / "site", {"band": "acme_band:Band"},
                     {"acme_band": IMPOSTOR.replace("Impostor", "Band")})
    env["MARK"] = str(tmp_path / "imported")
    out = run("policies", env=env)
    assert out.returncode == 0, out.stderr
    assert "band: acme_band:Band [not allowed: list it in allow_plugins]" in out.stdout.splitlines()
    assert not (tmp_path / "imported").exists()
    cfg = tmp_path / "band.toml"
    cfg.write_text('allow_plugins = ["acme_*"]\n')
    out = run("policies", "--config", str(cfg), env=env)
    assert "band: acme_band.Band () [allowed]" in out.stdout.splitlines(), out.stdout
    assert (tmp_path / "imported").exists()  # allowed: loaded to show its fields


def test_serve_refuses_a_tcp_port_past_65535_naming_it(tmp_path):
    """libzmq bound tcp://127.0.0.1:99999 as port 34463, and serve said ready there."""
    out = run("serve", "--bind", "tcp://127.0.0.1:99999", "--journal", str(tmp_path / "j.db"),
              "--metrics-port", "0")
    assert out.returncode == 2, out.stdout
    assert "bind" in out.stderr and "tcp://127.0.0.1:99999" in out.stderr
    assert "port '99999' is not a TCP port; allowed: 0 to 65535" in out.stderr


def test_keys_generate_refuses_a_number_of_clients_below_one(tmp_path):
    for n in ("-1", "0"):
        out = run("keys", "generate", str(tmp_path / n), "--clients", n)
        assert out.returncode == 2, out.stdout
        assert f"--clients {n}: allowed: a number of client key pairs >= 1" in out.stderr
        assert not (tmp_path / n).exists()


def test_an_operators_request_refused_before_it_is_sent_names_the_option_and_value():
    """Before, pydantic's message alone: 'Input should be greater than or equal to 0', and
    --timeout -1 was waited for and reported as no controller answering."""
    cases = [
        (("rollback", "x", "--to", "-5"), "--to -5: Input should be greater than or equal to 0"),
        (("pause", "x", "--reason", ""), "--reason '': String should have at least 1 character"),
        (("set", "bad name!", "lr=0.1"), "JOB 'bad name!': String should match pattern"),
        (("pause", "x", "--timeout", "-1"), "--timeout -1: allowed: a number of seconds > 0"),
    ]
    for args, said in cases:
        extra = () if "--reason" in args else ("--reason", "r")
        out = run(*args, *extra, "--endpoint", "tcp://127.0.0.1:1")
        assert out.returncode == 2 and said in out.stderr, (args, out.stderr)
