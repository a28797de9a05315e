"""The ``trimtab`` command.

    trimtab serve [--bind tcp://127.0.0.1:5555] [--metrics-port 9108] [--metrics-addr 127.0.0.1]
                  [--journal PATH]
                  [--config FILE] [--allow-remote]
    trimtab keys generate DIR [--clients N | --name NAME ...] [--operator NAME ...]
    trimtab decisions [JOB] [--journal PATH] [--kind KINDS] [--since WHEN] [--follow] [--json]
    trimtab jobs [--journal PATH] [--all] [--json]
    trimtab top [--journal PATH] [--all] [--interval SECONDS]
    trimtab set JOB KNOB=VALUE ... --reason WHY [--endpoint E] [--who NAME]
    trimtab pause JOB --reason WHY / trimtab resume JOB --reason WHY
    trimtab rollback JOB [--to STEP] --reason WHY
    trimtab policies [--config FILE]
    trimtab export JOB [--journal PATH] [--out FILE]
    trimtab replay TRACE --policy NAME [--set KEY=VALUE ...] [--job JOB] [--config FILE]
                   [--plot OUT.png] [--holds]
    trimtab rerun TRACE [--job JOB] [--config FILE]
    trimtab journal compact [--journal PATH] [--config FILE] [--vacuum]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from trimtab.controller.auth import AuthError
    from trimtab.controller.config import ConfigError, load_config
    from trimtab.controller.journal import JournalError
    from trimtab.controller.policy import PolicyLoadError
    from trimtab.controller.server import Server

    overrides: dict[str, Any] = {
        k: v for k, v in (("bind", args.bind), ("metrics_port", args.metrics_port),
                          ("metrics_addr", args.metrics_addr),
                          ("journal", args.journal), ("log_level", args.log_level))
        if v is not None}
    if args.allow_remote:
        overrides["allow_remote"] = True
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"trimtab serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = Server(config)
    except (PolicyLoadError, JournalError, OSError, AuthError) as exc:
        print(f"trimtab serve: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # zmq.ZMQError on a bad or busy endpoint
        print(f"trimtab serve: cannot start on {config.bind}: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: Any) -> None:
        server.stop_reason = signal.Signals(signum).name
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    config_file = args.config or os.environ.get("TRIMTAB_CONFIG") or None
    for line in server.describe(config_file):
        print(f"trimtab serve: {line}", file=sys.stderr, flush=True)
    # Tests and scripts wait for this line to know the sockets are bound.
    print(f"trimtab serve: ready on {server.endpoint} metrics_port={server.metrics_port or 0} "
          f"metrics={server.metrics_address or 'off'}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def _policies(args: argparse.Namespace) -> int:
    from trimtab.controller.config import ConfigError, load_config
    from trimtab.controller.policy import Policy, discover, ignored, is_allowed

    try:
        allow = load_config(args.config).allow_plugins
    except ConfigError as exc:
        print(f"trimtab policies: {exc}", file=sys.stderr)
        return 2
    for name, ep in discover().items():
        if not is_allowed(name, allow):  # not imported: its module's code does not run
            print(f"{name}: {ep.value} [not allowed: list it in allow_plugins]")
            continue
        try:  # the class, not an instance: a policy may have required config fields
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Policy)):
                raise TypeError(f"{cls!r} is not a trimtab Policy subclass")
        except Exception as exc:
            print(f"{name}: cannot load entry point {ep.value!r}: {type(exc).__name__}: {exc} "
                  f"[allowed]")
            continue
        props = cls.Config.model_json_schema().get("properties", {})
        fields = ", ".join(f"{k}={v['default']!r}" if "default" in v else f"{k} (required)"
                           for k, v in props.items())
        print(f"{name}: {cls.__module__}.{cls.__qualname__} ({fields}) [allowed]")
        compact = {k: {a: b for a, b in v.items() if a != "title"} for k, v in props.items()}
        print(f"  config schema: {json.dumps(compact, separators=(',', ':'))}")
    for lost, used in ignored():
        print(f"{lost.name}: {lost.value} [ignored: the name is {used.value}'s]")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trimtab.controller.journal import Journal, JournalError
    from trimtab.controller.replay import TraceError, trace_records, write_trace

    try:
        journal = Journal(args.journal, readonly=True)
        try:
            records = trace_records(journal, args.job)
        finally:
            journal.close()
    except (JournalError, TraceError) as exc:
        print(f"trimtab export: {exc}", file=sys.stderr)
        return 2
    if args.out in (None, "-"):
        write_trace(records, sys.stdout)
    else:
        with open(args.out, "w") as out:
            n = write_trace(records, out)
        print(f"trimtab export: {n} records of job {args.job} written to {args.out}",
              file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from trimtab.controller import replay as rp
    from trimtab.controller.config import ConfigError, ControllerConfig, load_config
    from trimtab.controller.journal import JournalError
    from trimtab.controller.policy import PolicyLoadError, load_policy

    try:
        config = load_config(args.config, env={}) if args.config else ControllerConfig()
        # Named on the command line, so allowed: nothing runs live.
        policy = load_policy(args.policy, rp.parse_sets(args.set or []))
        trace = rp.read_trace(args.trace, args.job)
        result = rp.replay(trace, [policy], config)
        if args.plot:
            rp.plot(result, args.plot)
    except (ConfigError, PolicyLoadError, JournalError, rp.TraceError) as exc:
        print(f"trimtab replay: {exc}", file=sys.stderr)
        return 2
    for line in result.lines(holds=args.holds):
        print(line)
    steps = [p.step for p in result.points]
    span = f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"
    print(f"# {policy.name} on {result.job}: {result.summary()} over "
          f"{len(steps)} reports ({span}); losses are the recorded ones, and each commanded "
          "value is assumed applied at the next report")
    if args.plot:
        print(f"# plot written to {args.plot}")
    return 0


def _rerun(args: argparse.Namespace) -> int:
    from trimtab.controller import replay as rp
    from trimtab.controller.config import ConfigError, load_config
    from trimtab.controller.journal import JournalError
    from trimtab.controller.policy import PolicyLoadError

    try:
        config = load_config(args.config, env={})
        commands = rp.rerun(rp.read_trace(args.trace, args.job), config)
    except (ConfigError, PolicyLoadError, JournalError, rp.TraceError) as exc:
        print(f"trimtab rerun: {exc}", file=sys.stderr)
        return 2
    for c in commands:
        what = [f"{k} x{v:.6g}" for k, v in c.scale.set().items()]
        what += [f"{k} {v:.6g}" for k, v in c.knobs.set().items()]
        if c.mark_stable is not None:
            what.append(f"mark {c.mark_stable} stable")
        if c.rollback_to is not None:
            what.append(f"roll back to {c.rollback_to}")
        if c.schedules is not None:
            what.append(f"live schedules {[s.knob for s in c.schedules]}")
        print(f"command {c.seq}: {', '.join(what) or 'nothing'} ({'; '.join(c.reasons)})")
    print(f"# {len(commands)} commands: the run's own messages through a fresh controller "
          f"with {'the config ' + args.config if args.config else 'the default config'}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from trimtab.controller.auth import SERVER_PUBLIC, SERVER_SECRET, AuthError, generate_keys

    operators = args.operator or []
    if args.clients is not None and not (args.clients >= 1 or (args.clients == 0 and operators)):
        print(f"trimtab keys: --clients {args.clients}: allowed: a number of client key pairs "
              ">= 1 (0 only with --operator)", file=sys.stderr)
        return 2
    clients = args.clients if args.clients is not None else (0 if operators else 1)
    names = args.name or [f"client-{i}" for i in range(1, clients + 1)]
    try:
        made = generate_keys(args.dir, names, operators)
    except (AuthError, OSError) as exc:
        print(f"trimtab keys: {exc}", file=sys.stderr)
        return 2
    root = args.dir.rstrip("/")
    print(f"controller: curve_server_secret = \"{root}/{SERVER_SECRET}\"")
    print(f"            curve_allowed_clients = \"{root}/allowed\"")
    if operators:
        print(f"            curve_operators = \"{root}/operators\"")
    for name, secret in made.items():
        if name in operators:
            print(f"operator {name}: trimtab set JOB ... --server-key {root}/{SERVER_PUBLIC} "
                  f"--key {secret}")
            continue
        print(f"client {name}: attach(..., server_key=\"{root}/{SERVER_PUBLIC}\", "
              f"client_key=\"{secret}\")")
    return 0


def _journal_compact(args: argparse.Namespace) -> int:
    from trimtab.controller.config import ConfigError, load_config
    from trimtab.controller.journal import Journal, JournalError
    from trimtab.controller.lock import JournalLock

    if not os.path.exists(args.journal):
        print(f"trimtab journal compact: no journal at {args.journal}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config).retention
    except ConfigError as exc:
        print(f"trimtab journal compact: {exc}", file=sys.stderr)
        return 2
    try:
        lock = JournalLock(  # a running serve compacts its journal itself
            args.journal, busy_advice="stop it first to compact by hand")
    except JournalError as exc:
        print(f"trimtab journal compact: {exc} (it compacts the journal itself every "
              f"{cfg.compact_every_s:g} s)", file=sys.stderr)
        return 2
    try:
        before = _db_bytes(args.journal)
        journal = Journal(args.journal)
        deleted = journal.compact(cfg)
        if args.vacuum:
            journal.vacuum()
        journal.close()
    except JournalError as exc:
        print(f"trimtab journal compact: {exc}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    for what, n in deleted.items():
        print(f"{what}: {n} rows deleted")
    after = _db_bytes(args.journal)
    print(f"journal {args.journal}: {before} bytes before, {after} after"
          + ("" if args.vacuum else " (freed pages are reused; --vacuum returns them)"))
    return 0


def _db_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimtab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the controller daemon")
    serve.add_argument("--bind", help="ZeroMQ endpoint (default tcp://127.0.0.1:5555)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (default 9108)")
    serve.add_argument("--metrics-addr",
                       help="address /metrics binds (default 127.0.0.1; 0.0.0.0: every interface)")
    serve.add_argument("--journal", help="SQLite journal path (default trimtab-journal.db)")
    serve.add_argument("--config", help="TOML config file (default $TRIMTAB_CONFIG)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --bind without CURVE keys (unauthenticated)")
    serve.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="CURVE keys for an authenticated, encrypted link")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser("generate", help="write the controller's key pair (unless "
                              "present) and one key pair per client into DIR")
    gen.add_argument("dir", help="key directory (created if missing)")
    who = gen.add_mutually_exclusive_group()
    who.add_argument("--clients", type=int, default=None, metavar="N",
                     help="N clients named client-1 .. client-N (default 1, none with only "
                          "--operator)")
    who.add_argument("--name", action="append", metavar="NAME",
                     help="a client's name; repeatable")
    gen.add_argument("--operator", action="append", metavar="NAME",
                     help="a person allowed to steer jobs (trimtab set, pause, resume, "
                          "rollback); repeatable")
    gen.set_defaults(func=_keys)
    from trimtab.controller.cli_operate import add_parsers as add_operator_parsers
    from trimtab.controller.cli_people import add_parsers

    add_parsers(sub)
    add_operator_parsers(sub)
    pol = sub.add_parser("policies", help="list installed policies, their config schema and "
                         "whether the config allows them")
    pol.add_argument("--config", help="TOML config file (default $TRIMTAB_CONFIG)")
    pol.set_defaults(func=_policies)
    exp = sub.add_parser("export", help="write a job's trace (registration, reports, acks) "
                         "as JSON lines")
    exp.add_argument("job")
    exp.add_argument("--journal", default="trimtab-journal.db")
    exp.add_argument("--out", help="file to write (default: standard output)")
    exp.set_defaults(func=_export)
    rep = sub.add_parser("replay", help="run a policy offline over a recorded trace and print "
                         "the decisions it would have made")
    rep.add_argument("trace", help="a JSONL trace from `trimtab export`, or a journal")
    rep.add_argument("--policy", required=True, help="entry-point name or dotted path")
    rep.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="a policy config value (JSON, else a string); repeatable")
    rep.add_argument("--job", help="the job, when TRACE is a journal of several")
    rep.add_argument("--config", help="TOML config for the governor, signals and rollback "
                     "(default: the defaults)")
    rep.add_argument("--plot", metavar="OUT.png", help="draw loss, knobs and decisions")
    rep.add_argument("--holds", action="store_true",
                     help="also print the wishes a hold or the governor kept from changing")
    rep.set_defaults(func=_replay)
    rer = sub.add_parser("rerun", help="take a recorded job's messages through a fresh "
                         "controller and print the commands it sends (with the live run's "
                         "config: the live run's commands)")
    rer.add_argument("trace", help="a JSONL trace from `trimtab export`, or a journal")
    rer.add_argument("--job", help="the job, when TRACE is a journal of several")
    rer.add_argument("--config", help="the controller's TOML config (default: the defaults)")
    rer.set_defaults(func=_rerun)
    jour = sub.add_parser("journal", help="maintain a journal")
    jour_sub = jour.add_subparsers(dest="journal_command", required=True)
    comp = jour_sub.add_parser("compact", help="apply the retention rules now (what "
                               "trimtab serve does every compact_every_s)")
    comp.add_argument("--journal", default="trimtab-journal.db")
    comp.add_argument("--config", help="TOML config with [retention] (default "
                      "$TRIMTAB_CONFIG, else the defaults)")
    comp.add_argument("--vacuum", action="store_true",
                      help="also give the freed pages back to the file system")
    comp.set_defaults(func=_journal_compact)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `trimtab decisions | head` closed the pipe: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
