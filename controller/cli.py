"""The ``trimtab`` command.

    trimtab serve [--bind tcp://127.0.0.1:5555] [--metrics-port 9108] [--journal PATH]
                  [--config FILE]
    trimtab decisions [--journal PATH] [--job JOB]
    trimtab policies
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from trimtab.controller.config import ConfigError, load_config
    from trimtab.controller.journal import JournalError
    from trimtab.controller.policy import PolicyLoadError
    from trimtab.controller.server import Server

    overrides: dict[str, Any] = {
        k: v for k, v in (("bind", args.bind), ("metrics_port", args.metrics_port),
                          ("journal", args.journal), ("log_level", args.log_level))
        if v is not None}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"trimtab serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = Server(config)
    except (PolicyLoadError, JournalError, OSError) as exc:
        print(f"trimtab serve: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # zmq.ZMQError on a bad or busy endpoint
        print(f"trimtab serve: cannot start on {config.bind}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    # Tests and scripts wait for this line to know the sockets are bound.
    print(f"trimtab serve: ready on {server.endpoint} metrics_port={server.metrics_port or 0}",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def _decisions(args: argparse.Namespace) -> int:
    from trimtab.controller.journal import Journal, JournalError

    try:
        journal = Journal(args.journal)
    except JournalError as exc:
        print(f"trimtab decisions: {exc}", file=sys.stderr)
        return 2
    kinds = {"command", "ack", "policy_error", "lost", "register", "bye", "stable",
             "rollback", "restored", "alert"}
    for ev in journal.iter_events(args.job):
        if ev.kind not in kinds:
            continue
        when = time.strftime("%H:%M:%S", time.localtime(ev.ts))
        seq = f" #{ev.seq}" if ev.seq is not None else ""
        print(f"{when} {ev.job} step={ev.step} {ev.kind}{seq} {json.dumps(ev.data)}")
    journal.close()
    return 0


def _policies(args: argparse.Namespace) -> int:
    from trimtab.controller.policy import PolicyLoadError, discover, load_policy

    for name in discover():
        try:
            policy = load_policy(name, None)
        except PolicyLoadError as exc:
            print(f"{name}: cannot load: {exc}")
            continue
        schema = policy.Config.model_json_schema().get("properties", {})
        fields = ", ".join(f"{k}={v.get('default')!r}" for k, v in schema.items())
        print(f"{name}: {type(policy).__module__}.{type(policy).__qualname__} ({fields})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimtab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the controller daemon")
    serve.add_argument("--bind", help="ZeroMQ endpoint (default tcp://127.0.0.1:5555)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (default 9108)")
    serve.add_argument("--journal", help="SQLite journal path (default trimtab-journal.db)")
    serve.add_argument("--config", help="TOML config file (default $TRIMTAB_CONFIG)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)
    dec = sub.add_parser("decisions", help="print the commands, acks and events in a journal")
    dec.add_argument("--journal", default="trimtab-journal.db")
    dec.add_argument("--job", help="only this job")
    dec.set_defaults(func=_decisions)
    pol = sub.add_parser("policies", help="list installed policies and their config defaults")
    pol.set_defaults(func=_policies)
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
