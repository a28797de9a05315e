"""``trimtab set``, ``pause``, ``resume`` and ``rollback``: a person steers a live job.

Each sends one :class:`~trimtab.protocol.wire.Operate` request to the running controller,
on the socket the jobs use, and prints its answer: what was done (the command sent to
the job), or why it was refused (nothing changed). The controller carries it out through
the job's governor and journals it with who and why (see
:mod:`~trimtab.controller.manual`); ``trimtab decisions JOB --kind manual,command,ack``
shows it and the ack of the values then in force.

When the request sends the job a command, the CLI then waits (``--wait``, 10 s) for the
job to apply it and prints the values the job's step used, as its ack says them.

Exit status: 0 done (applied, or still pending after ``--wait``), 1 refused or never to be
applied (the job ended, a rollback replaced it), 2 not sent or not answered (a bad
argument, no controller at the endpoint within ``--timeout``).
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import time
import uuid

__all__ = ["add_parsers", "parse_values"]


def parse_values(items: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """``KNOB=VALUE`` arguments as ``(values, multipliers)``; ``lr=x0.5`` (lr and weight
    decay only) is a multiplier on the loop's own value. Raises ValueError naming the
    argument and what is allowed.

    >>> parse_values(["lr=3e-4", "momentum=0.9", "weight_decay=x0.5"])
    ({'lr': 0.0003, 'momentum': 0.9}, {'weight_decay': 0.5})
    """
    from trimtab.protocol.wire import KNOBS

    values: dict[str, float] = {}
    scale: dict[str, float] = {}
    for item in items:
        knob, sep, text = item.partition("=")
        if not sep or knob not in KNOBS:
            raise ValueError(f"{item!r}: expected KNOB=VALUE with KNOB one of "
                             f"{', '.join(KNOBS)} (e.g. lr=3e-4, lr=x0.5)")
        if knob in values or knob in scale:
            raise ValueError(f"{item!r}: {knob} given twice")
        multiplier = text.startswith("x")
        if multiplier and knob not in ("lr", "weight_decay"):
            raise ValueError(f"{item!r}: only lr and weight_decay take a multiplier (xF); "
                             f"give {knob} as a value")
        try:
            number = float(text[1:] if multiplier else text)
        except ValueError:
            raise ValueError(f"{item!r}: {text!r} is not a number") from None
        if not number >= 0 or number == float("inf"):
            raise ValueError(f"{item!r}: a finite number >= 0 is needed")
        (scale if multiplier else values)[knob] = number
    return values, scale


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    if os.environ.get("TRIMTAB_ENDPOINT"):
        return os.environ["TRIMTAB_ENDPOINT"]
    if args.config:
        from trimtab.controller.config import load_config

        return load_config(args.config).bind
    return _default_bind()


def _default_bind() -> str:
    """Where ``trimtab serve`` listens unless told otherwise (its config's default)."""
    from trimtab.controller.config import ControllerConfig

    return ControllerConfig.model_fields["bind"].default


def _request(args: argparse.Namespace):
    from trimtab.protocol import wire

    values, scale = parse_values(getattr(args, "values", None) or [])
    return wire.Operate(
        job=args.job, action=args.action, knobs=wire.Knobs(**values),
        scale=wire.ScaleTargets(**scale), to_step=getattr(args, "to", None),
        who=args.who or f"{getpass.getuser()}@{socket.gethostname()}", reason=args.reason,
        request=uuid.uuid4().hex[:16], wait=args.wait > 0)


#: The option or argument a request's field comes from, as a refusal names it.
_OPTION = {"job": "JOB", "to_step": "--to", "reason": "--reason", "who": "--who"}


def _named(error: dict) -> str:
    """A request's validation error as the person typed it: the option, the value, and
    what is wrong (``--to -5: Input should be greater than or equal to 0``).

    >>> _named({"loc": ("to_step",), "input": -5, "msg": "Input should be >= 0"})
    '--to -5: Input should be >= 0'
    >>> _named({"loc": ("lr",), "input": -1.0, "msg": "must be > 0"})
    'lr=-1.0: must be > 0'
    """
    field = str(error["loc"][0]) if error.get("loc") else ""
    value = error.get("input")
    if field in _OPTION:
        shown = repr(value) if isinstance(value, str) else str(value)
        return f"{_OPTION[field]} {shown}: {error['msg']}"
    if field:
        return f"{field}={value}: {error['msg']}"
    return str(error["msg"])


def _operate(args: argparse.Namespace) -> int:
    import zmq
    import zmq.auth
    from pydantic import ValidationError

    from trimtab.controller.config import ConfigError
    from trimtab.protocol import wire

    command = f"trimtab {args.action}"
    for option, value, ok in (("--timeout", args.timeout, args.timeout > 0),
                              ("--wait", args.wait, args.wait >= 0)):
        if not ok:
            print(f"{command}: {option} {value:g}: allowed: a number of seconds "
                  f"{'> 0' if option == '--timeout' else '>= 0 (0: do not wait)'}",
                  file=sys.stderr)
            return 2
    try:
        request = _request(args)
        endpoints = [e.strip() for e in _endpoint(args).split(",")]
        for endpoint in endpoints:
            if endpoint.partition("://")[0] not in ("tcp", "ipc", "inproc"):
                raise ValueError(f"endpoint {endpoint!r} is not a ZeroMQ endpoint; allowed: "
                                 "tcp://HOST:PORT, ipc://PATH, inproc://NAME (or a comma "
                                 "list of them: the controllers jobs are sharded across)")
        # Jobs sharded across controllers: the one this job's client picks.
        endpoint = wire.shard_of(args.job, endpoints)
    except (ValueError, ValidationError, ConfigError) as exc:
        why = _named(exc.errors()[0]) if isinstance(exc, ValidationError) else str(exc)
        print(f"{command}: {why}", file=sys.stderr)
        return 2
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if args.server_key or args.key:
            if not (args.server_key and args.key):
                print(f"{command}: CURVE needs both --server-key and --key", file=sys.stderr)
                return 2
            try:
                server_public, _ = zmq.auth.load_certificate(args.server_key)
                public, secret = zmq.auth.load_certificate(args.key)
            except (OSError, ValueError) as exc:
                print(f"{command}: cannot read a key: {exc}", file=sys.stderr)
                return 2
            if secret is None:
                print(f"{command}: --key {args.key} holds no secret key; expected the "
                      "NAME.key_secret of `trimtab keys generate --operator NAME`",
                      file=sys.stderr)
                return 2
            sock.curve_serverkey, sock.curve_publickey = server_public, public
            sock.curve_secretkey = secret
        sock.connect(endpoint)
        sock.send(wire.encode(request))
        reply = _next_answer(sock, request, args.timeout)
        if isinstance(reply, wire.Error):
            print(f"{command}: the controller refused the request: {reply.code}: "
                  f"{reply.detail}", file=sys.stderr)
            return 2
        if reply is not None:
            stream = sys.stdout if reply.ok else sys.stderr
            verdict = "done" if reply.ok else "refused"
            print(f"{command} {args.job}: {verdict}: {reply.detail}", file=stream, flush=True)
            if not reply.ok or reply.seq is None or not request.wait:
                return 0 if reply.ok else 1
            return _await_applied(sock, request, reply.seq, command, args)
        print(f"{command}: no answer from a controller at {endpoint} within {args.timeout:g} s"
              " (is `trimtab serve` running there? --endpoint, TRIMTAB_ENDPOINT or --config "
              "name it; with CURVE, --server-key and an operator --key)", file=sys.stderr)
        return 2
    finally:
        sock.close(0)
        ctx.term()


def _next_answer(sock, request, seconds: float):
    """The controller's next answer to ``request`` (an ``Operated``, or an ``Error``), or
    None when none came within ``seconds``."""
    from trimtab.protocol import wire

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
        try:
            reply = wire.decode(sock.recv())
        except wire.WireError:
            continue
        if isinstance(reply, wire.Error) or (
                isinstance(reply, wire.Operated) and reply.request == request.request):
            return reply
    return None


def _await_applied(sock, request, seq: int, command: str, args: argparse.Namespace) -> int:
    """The second answer: the job applied command ``seq`` (0), will not (1), or has not
    said so within ``--wait`` seconds (0: it stays pending)."""
    from trimtab.protocol import wire

    reply = _next_answer(sock, request, args.wait)
    if isinstance(reply, wire.Operated):
        stream = sys.stdout if reply.ok else sys.stderr
        print(f"{command} {args.job}: {reply.detail}", file=stream)
        return 0 if reply.ok else 1
    print(f"{command} {args.job}: command {seq} not applied within {args.wait:g} s; it is "
          "pending and applies at the job's next step (`trimtab decisions "
          f"{args.job} --kind manual,command,ack` shows its ack)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``set``, ``pause``, ``resume`` and ``rollback`` on the ``trimtab`` command."""

    def job(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("job", help="the job's name (as `trimtab jobs` lists it)")
        return p

    def common(p: argparse.ArgumentParser, action: str) -> None:
        p.add_argument("--reason", required=True, help="why (journaled with it)")
        p.add_argument("--who", help="who asks (default: USER@HOST)")
        p.add_argument("--endpoint", help="the controller's socket (default: $TRIMTAB_ENDPOINT, "
                       f"the --config's bind, or {_default_bind()}); a comma list: the "
                       "controllers jobs are sharded across (the job's own is picked as its "
                       "client picks it)")
        p.add_argument("--config", help="the controller's config file (for its bind)")
        p.add_argument("--server-key", help="CURVE: the controller's public key file")
        p.add_argument("--key", help="CURVE: your operator key pair file "
                       "(`trimtab keys generate --operator NAME`)")
        p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="how long to wait for the controller's answer (default 5)")
        p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                       help="then how long to wait for the job to apply the command it sends, "
                            "printing the values its step used (default 10; 0: do not wait)")
        p.set_defaults(func=_operate, action=action)

    p = job(sub.add_parser("set", help="set a live job's lr, momentum, weight decay or "
                           "clip, within its governor's bounds"))
    p.add_argument("values", nargs="+", metavar="KNOB=VALUE",
                   help="lr=3e-4 (the lr the optimizer is to use), lr=x0.5 (a multiplier on "
                        "the loop's own lr), momentum=0.9, weight_decay=0.01, clip=1.0")
    common(p, "set")
    p = job(sub.add_parser("pause", help="stop a live job's policies (the safety net stays "
                           "on)"))
    common(p, "pause")
    p = job(sub.add_parser("resume", help="let a paused job's policies act again"))
    common(p, "resume")
    p = job(sub.add_parser("rollback", help="roll a live job back to a checkpoint it holds"))
    p.add_argument("--to", type=int, metavar="STEP",
                   help="the checkpoint's step (default: the newest stable one)")
    common(p, "rollback")
