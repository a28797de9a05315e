"""The wire format: every message between a training job and the controller.

Both sides import this one module. A message is one ZeroMQ frame of UTF-8 JSON
with a ``type`` tag and a protocol version ``v``; it is validated here, at the
edge, with pydantic models that refuse unknown fields and non-finite numbers.

>>> from trimtab.protocol import wire
>>> raw = wire.encode(wire.Heartbeat(job="demo", step=3))
>>> wire.decode(raw)
Heartbeat(type='heartbeat', v=2, job='demo', step=3)

A frame that cannot be taken raises :class:`WireError`, whose ``code`` says why
(``oversized``, ``malformed``, ``version``, ``nonfinite``, ``invalid``); the
controller answers it with an :class:`Error` message carrying the same code. The
controller's own refusals add ``unknown_job``, ``unexpected``, ``stale`` (a replayed or
out-of-order sequence number), ``forbidden`` (another CURVE key's job) and
``rate_limited`` (a peer over its message rate).

A person steers a job through the same controller (``trimtab set``, ``pause``,
``resume``, ``rollback``): an :class:`Operate` message on the same socket, answered with
:class:`Operated` (done, or refused and why).
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import metadata as _metadata
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from .values import (
    KNOBS,
    Count,
    Finite,
    JobId,
    Knob,
    Knobs,
    LiveSchedule,
    NonNeg,
    RunId,
    Scale,
    ScaleFacts,
    ScaleTargets,
    SchedulePiece,
    Text,
    _Model,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "MAX_LISTED",
    "KNOBS",
    "ERROR_CODES",
    "Knob",
    "Knobs",
    "Scale",
    "ScaleFacts",
    "Register",
    "Report",
    "SchedulePiece",
    "LiveSchedule",
    "ScaleTargets",
    "Command",
    "Ack",
    "Heartbeat",
    "Bye",
    "Error",
    "Operate",
    "Operated",
    "OPERATOR_ACTIONS",
    "Message",
    "WireError",
    "encode",
    "decode",
]

#: 2: the knob model (lr and weight decay commanded as multipliers on the user's values).
PROTOCOL_VERSION = 2
#: Frames above this size are refused before they are parsed.
MAX_MESSAGE_BYTES = 64 * 1024
#: The most checkpoint steps a report or registration lists (the newest ones).
MAX_LISTED = 256
#: Codes an :class:`Error` reply may carry.
ERROR_CODES: tuple[str, ...] = (
    "oversized",
    "malformed",
    "version",
    "nonfinite",
    "invalid",
    "unknown_job",
    "unexpected",
    "stale",
    "forbidden",
    "rate_limited",
)

class Register(_Model):
    """Client -> controller: a job starts (or reconnects: same ``job`` and ``run_id``)."""

    type: Literal["register"] = "register"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    run_id: RunId
    step: Count = 0
    report_every: Annotated[int, Field(ge=1, le=1_000_000)]
    facts: ScaleFacts
    #: The values in force at registration (effective; see :class:`Knobs`).
    knobs: Knobs
    #: The user's own values at registration, and trimtab's multipliers on them.
    base: Knobs = Knobs()
    scale: Scale = Scale()
    #: The sequence number of the last command this client applied (0: none).
    applied_seq: Count = 0
    #: Which of this client's links (connection attempts, counted from 1) it goes on.
    link: Count = 0
    #: Times this run was resumed from a saved guard state (``guard.load_state_dict``) in
    #: a new process; a registration with more than the controller has seen is a resume,
    #: at ``step``: what the controller saw after it belongs to a trajectory set aside.
    resume: Count = 0
    #: With ``resume``: the step the run was resumed at (its save's); ``step`` is where the
    #: run is when the registration goes out, maybe a few steps on.
    resume_step: Count | None = None
    #: With ``resume``: an id the process made when it loaded the saved state, the same on
    #: every registration of that process (a reconnect) and new in each process that
    #: loads one: two processes resumed from the same save count the same ``resume`` and
    #: are told apart by it (None: an older client; ``resume`` alone then).
    resume_id: RunId | None = None
    #: Steps of the checkpoints this client can restore, oldest first, and the newest the
    #: controller marked stable (as a report lists them), so that a controller that starts
    #: or restarts, or follows a resume, knows them before the first report.
    checkpoints: Annotated[list[Count], Field(max_length=MAX_LISTED)] = []
    stable_step: Count | None = None
    #: The step of the checkpoint of the run as its user handed it over -- the snapshot
    #: taken at attach, or of the state a resumed process loaded -- while the client holds
    #: it: the controller marks it stable with the first report, as the rollback target of
    #: last resort (None: not held, or an older client).
    origin: Count | None = None
    #: The live schedules this client runs (a resumed one: those it was saved with; None:
    #: not told, an older client).
    schedules: Annotated[list[LiveSchedule], Field(max_length=len(KNOBS))] | None = None
    #: How many of its newest checkpoints the client keeps, besides the newest stable one
    #: (``attach(keep=)``): which one its next snapshot evicts (None: not told, no
    #: checkpoints or an older client).
    keep: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    #: The lr the loop's torch scheduler scales for group 0 (its ``initial_lr``;
    #: ``max_lr`` for OneCycleLR), however far a warm-up has come at registration: what an
    #: absolute lr a schedule policy is configured with relates to (None: not told, a loop
    #: without a scheduler or an older client; the registered lr then).
    nominal_lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    #: False: the loss is not expected to fall as the run learns (a policy-gradient loss
    #: such as PPO's, a GAN's generator): the controller draws nothing from its trend
    #: (``attach(loss_trend=False)``). None: it is (the default, and an older client).
    loss_trend: Literal[False] | None = None
    #: True: the optimizer already held state when the guard attached (the run continues
    #: one that trained, without trimtab's state: a fine-tune resumed from its own
    #: checkpoint, a run continued from saved weights and optimizer): its LR has run
    #: before, so the range test looks for no evidence, as for a run met past its start.
    #: None: a fresh optimizer (and an older client).
    warm_start: Literal[True] | None = None
    #: The highest lr of the param groups over group 0's, where it is higher (layer-wise LR
    #: decay puts group 0, the input layer, at a fraction of the head's lr): ``knobs.lr``
    #: and ``nominal_lr`` are group 0's, and an absolute lr (a policy's, the optimizer
    #: family's sane range) relates to the highest, group 0's times this. None: group 0's
    #: is the highest (and an older client).
    lr_spread: Annotated[float, Field(gt=1.0, le=1e12, allow_inf_nan=False)] | None = None


class Report(_Model):
    """Client -> controller: one report window of probed signals.

    Loss statistics are over the window's finite losses (``None`` when none was
    finite); gradient norms are global L2 norms before clipping.
    """

    type: Literal["report"] = "report"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    seq: Annotated[int, Field(ge=1)]
    #: ``global_step`` at the end of the window (optimizer steps taken).
    step: Count
    #: Training steps in this window (guard.step calls, skipped ones included).
    window: Annotated[int, Field(ge=1, le=1_000_000)]
    loss_mean: Finite | None = None
    loss_last: Finite | None = None
    loss_min: Finite | None = None
    loss_max: Finite | None = None
    grad_norm_mean: NonNeg | None = None
    grad_norm_max: NonNeg | None = None
    grad_norm_std: NonNeg | None = None
    group_grad_norms: Annotated[list[NonNeg], Field(max_length=1024)] = []
    #: ||delta theta|| / ||theta|| over one sampled step of the window.
    update_ratio: NonNeg | None = None
    #: cos(g, -delta theta): the window's first gradient against the update before it
    #: (the hypergradient's sign: clearly positive when the LR is too low).
    update_alignment: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] | None = None
    nonfinite_losses: Count = 0
    nonfinite_grads: Count = 0
    skipped_steps: Count = 0
    step_time_s: NonNeg | None = None
    #: The lowest and highest lr put in for the window's steps (param group 0's,
    #: effective: the loop's own times trimtab's multiplier; None where the lr is a tensor):
    #: a loop that wrote another lr for a few steps mid-window shows it here, not in knobs.
    lr_window_min: NonNeg | None = None
    lr_window_max: NonNeg | None = None
    #: Under torch.distributed with replicated parameters (DDP): how far apart the ranks'
    #: parameter checksums stood at the window's end, ``(max - min) / max(|max|, |min|)``
    #: over ranks; 0 while the replicas are identical (None: one process, a sharded model,
    #: or non-finite parameters).
    replica_spread: NonNeg | None = None
    #: ...and whether their bytes were identical, every parameter's, bit for bit (compared
    #: by a sum of the bytes read as integers, which any change of an element moves).
    replicas_identical: bool | None = None
    #: The values the optimizer used at the window's last step (effective)...
    knobs: Knobs
    #: ...the user's own values at that step (``clip``: None), and trimtab's multipliers.
    base: Knobs = Knobs()
    scale: Scale = Scale()
    #: Steps of the window whose gradient norm sat at a ceiling the loop clips to itself
    #: (its own ``clip_grad_norm_`` before the guard saw the gradients), and that ceiling:
    #: the norms of those steps are the clip, not the gradient's (None: none detected).
    user_clipped_steps: Count = 0
    user_clip: NonNeg | None = None
    #: Made after this client had heard no controller for a whole liveness window (none
    #: running yet, or restarting): sent later, it tells a past no controller saw live.
    offline: bool = False
    #: The client's link (see :attr:`Register.link`) when it was made: a report made under
    #: an earlier link than the registration's predates it (a controller restarted).
    link: Count = 0
    #: Reports this client has dropped so far because its queue was full.
    dropped_reports: Count = 0
    applied_seq: Count = 0
    #: Steps of the checkpoints this client can restore (host ring and disk), oldest first.
    checkpoints: Annotated[list[Count], Field(max_length=MAX_LISTED)] = []
    #: The newest checkpoint the controller marked stable (None: none yet).
    stable_step: Count | None = None
    #: The newest validation metric the loop handed to ``guard.report_validation`` since
    #: the last report (lower is better), with the step it was measured at.
    validation: Finite | None = None
    validation_step: Count | None = None
    #: The same validation measured on the client's weight average (``attach(..., ema=)``,
    #: ``guard.report_validation(value, ema=...)``), at ``validation_step`` too (None: none).
    validation_ema: Finite | None = None
    #: Per-micro-batch gradient statistics for the gradient-noise-scale estimate, when the
    #: loop accumulates gradients: mean squared micro-batch grad norm and micro-batches.
    micro_sq_norm_mean: NonNeg | None = None
    micro_batches: Annotated[int, Field(ge=1, le=1_000_000)] | None = None




class Command(_Model):
    """Controller -> client: applied at the next step boundary, in this order:

    1. ``mark_stable``: the checkpoint taken at that step is stable (a rollback target);
    2. ``rollback_to``: restore the stable checkpoint taken at that step (model, optimizer,
       RNG, scheduler, multipliers, momentum, clip, step);
    3. ``scale``: the lr and weight-decay multipliers on the user's own values from now on
       (a field left ``None`` keeps the one in force); ``knobs``: momentum and clip,
       absolute (``None``: unchanged); ``lr_max``: the cap above which a multiplier over 1
       never takes the effective lr (the user's own lr is never lowered by it);
    4. ``schedules``: when not None, the live schedules from now on (``[]``: none), each
       evaluated before every optimizer step from this one on (overriding its knob's target).
    """

    type: Literal["command"] = "command"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    seq: Annotated[int, Field(ge=1)]
    #: Momentum and clip only: lr and weight decay are multipliers (``scale``).
    knobs: Knobs = Knobs()
    scale: ScaleTargets = ScaleTargets()
    lr_max: NonNeg | None = None
    reasons: Annotated[list[Text], Field(max_length=64)] = []
    mark_stable: Count | None = None
    rollback_to: Count | None = None
    #: The controller recommends stopping the run, and why (surfaced as guard.should_stop).
    stop_advice: Text | None = None
    #: The live schedules from now on, one per knob (None: those in force stay).
    schedules: Annotated[list[LiveSchedule], Field(max_length=2)] | None = None

    @model_validator(mode="after")
    def _one_schedule_per_knob(self) -> Command:
        for name in ("lr", "weight_decay"):
            if getattr(self.knobs, name) is not None:
                raise ValueError(f"knobs.{name}={getattr(self.knobs, name)!r}: {name} is "
                                 f"commanded as a multiplier on the user's value (scale.{name})")
        knobs = [s.knob for s in self.schedules or ()]
        if len(set(knobs)) != len(knobs):
            raise ValueError(f"schedules: one per knob, got {knobs}")
        return self


class Ack(_Model):
    """Client -> controller: a command was applied. Sent at the first optimizer step that
    runs with it (after a rollback, the next step taken): ``knobs`` are the effective
    values that step used, ``base`` the user's own values then, ``scale`` the multipliers;
    ``step`` is ``global_step`` as that step begins (the steps taken without it)."""

    type: Literal["ack"] = "ack"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    seq: Annotated[int, Field(ge=1)]
    step: Count
    knobs: Knobs
    base: Knobs = Knobs()
    scale: Scale = Scale()
    #: The step the run was rolled back to, when the command ordered a rollback and it
    #: succeeded (``step`` is then that step too).
    restored_step: Count | None = None
    #: With ``restored_step``: the client's ``global_step`` when it carried the rollback
    #: out, the steps from there back to ``restored_step`` lost (a command reaches a fast
    #: loop some steps after the report it was decided on; None: an older client).
    rolled_back_from: Count | None = None
    #: Why part of the command could not be carried out (e.g. no such checkpoint).
    error: Text | None = None


class Heartbeat(_Model):
    """Either way: I am alive. The controller answers each client heartbeat with one, and,
    while the job's range test sweeps, each report it observes (after what it decided on
    it). From the controller, ``step`` is the newest step it has seen: the client runs a
    sweep at most a few report windows past it (it never climbs far while no controller
    watches)."""

    type: Literal["heartbeat"] = "heartbeat"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    step: Count = 0


class Bye(_Model):
    """Client -> controller: the job ends on purpose."""

    type: Literal["bye"] = "bye"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    step: Count = 0
    reason: Text = "closed"


class Validation(_Model):
    """Client -> controller: a validation result no report carried, sent as the run ends
    (:meth:`Guard.close`): one handed over after the run's last report -- an evaluation at
    the last step, which ended a report window -- with no step left for a report to
    carry it. (Added within protocol version 2: a controller from before it refuses it as
    ``invalid``, an error reply and a count, and takes the Bye that follows.)"""

    type: Literal["validation"] = "validation"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    #: The step it was measured at (as :attr:`Report.validation_step`).
    step: Count
    value: Finite
    #: The same validation of the weight average (as :attr:`Report.validation_ema`).
    ema: Finite | None = None
    #: The run it belongs to (:attr:`Register.run_id`): set on one sent after the run said
    #: Bye (an evaluation after training, e.g. ``trainer.evaluate()`` after ``train()``),
    #: which the controller adds to that ended run's results, if it is the job's newest.
    run_id: RunId | None = None


#: What a person can do to a job (:class:`Operate`).
OPERATOR_ACTIONS: tuple[str, ...] = ("set", "pause", "resume", "rollback")


class Operate(_Model):
    """Operator -> controller: a person steers a live job (``trimtab set JOB lr=3e-4``).

    - ``set``: ``knobs`` are the values asked, as the optimizer is to use them (lr and
      weight decay too: the controller turns them into multipliers on the user's own
      values at the job's last report), or ``scale`` the lr and weight-decay multipliers
      themselves; each within the governor's bounds, or the whole request is refused;
    - ``pause``: the policies' proposals are no longer acted on (the safety net stays on);
      ``resume`` ends it;
    - ``rollback``: restore the checkpoint at ``to_step`` (None: the newest stable one).

    ``who`` and ``reason`` are journaled with what was done; ``request`` is echoed in the
    reply.
    """

    type: Literal["operate"] = "operate"
    v: Literal[2] = PROTOCOL_VERSION
    job: JobId
    action: Literal["set", "pause", "resume", "rollback"]
    knobs: Knobs = Knobs()
    scale: ScaleTargets = ScaleTargets()
    to_step: Count | None = None
    who: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1, max_length=1024)]
    request: Annotated[str, Field(max_length=64)] = ""
    #: Answer a second time once the job has applied the command this sends (see
    #: :class:`Operated`).
    wait: bool = False

    @model_validator(mode="after")
    def _fits_action(self) -> Operate:
        asked = {**self.knobs.set(), **{k: v for k, v in self.scale.model_dump().items()
                                       if v is not None}}
        if self.action == "set":
            if not asked:
                raise ValueError("set: name at least one knob (lr, momentum, weight_decay, clip)")
            both = [k for k in ("lr", "weight_decay")
                    if getattr(self.knobs, k) is not None and getattr(self.scale, k) is not None]
            if both:
                raise ValueError(f"set: {both[0]} given both as a value and as a multiplier; "
                                 "give one")
        elif asked:
            raise ValueError(f"{self.action}: takes no knob values (got {sorted(asked)})")
        if self.to_step is not None and self.action != "rollback":
            raise ValueError(f"{self.action}: to_step is for rollback only")
        return self


class Operated(_Model):
    """Controller -> operator: the answer to an :class:`Operate` (``ok``: done; else refused,
    nothing changed). ``detail`` says what was done or why not; ``seq`` is the command sent
    to the job (None: none was needed).

    A request that sent a command and asked to ``wait`` gets a second answer once the job
    applied it (``applied``): the step it was first used at, and the values that step used
    (``knobs``, effective; ``scale``, trimtab's multipliers), as the job's ack says them;
    or, ``ok`` False, why it will not be (the job ended, a rollback replaced it)."""

    type: Literal["operated"] = "operated"
    v: Literal[2] = PROTOCOL_VERSION
    job: Annotated[str, Field(max_length=128)]
    request: Annotated[str, Field(max_length=64)] = ""
    ok: bool
    detail: Text
    seq: Count | None = None
    applied: bool = False
    step: Count | None = None
    knobs: Knobs | None = None
    scale: Scale | None = None


class Error(_Model):
    """Controller -> client: a message was refused, and why."""

    type: Literal["error"] = "error"
    v: Literal[2] = PROTOCOL_VERSION
    code: Literal[
        "oversized", "malformed", "version", "nonfinite", "invalid", "unknown_job", "unexpected",
        "stale", "forbidden", "rate_limited", "conflict",
    ]
    detail: Text
    job: Annotated[str, Field(max_length=128)] | None = None


Message = Annotated[
    Union[Register, Report, Command, Ack, Heartbeat, Bye, Error, Operate, Operated,  # noqa: UP007
          Validation],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


class WireError(ValueError):
    """A frame that cannot be taken. ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, detail: str, job: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail[:1024]
        self.job = job


#: Fields added to a message within protocol version 2, per message type: left out of a
#: frame while they are ``None``, so that a peer from before them (which refuses unknown
#: fields) still takes every message that does not use them.
_ADDED_IN_V2: dict[type[BaseModel], tuple[str, ...]] = {
    Report: ("validation_ema", "update_alignment"),
    Register: ("keep", "nominal_lr", "resume_id", "origin", "loss_trend", "warm_start",
               "lr_spread"),
    Ack: ("rolled_back_from",),
    Validation: ("run_id",)}


def encode(message: BaseModel) -> bytes:
    """One frame for ``message``.

    >>> b"validation_ema" in encode(Report(job="j", seq=1, step=0, window=1, knobs=Knobs()))
    False
    """
    added = _ADDED_IN_V2.get(type(message), ())
    unset = {name for name in added if getattr(message, name) is None}
    return message.model_dump_json(exclude_none=False, exclude=unset or None).encode()


def _refuse_constant(name: str) -> Any:
    raise WireError("nonfinite", f"non-finite number {name} in message")


def decode(frame: bytes) -> Message:
    """Parse and validate one frame, or raise :class:`WireError` saying why."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise WireError("oversized", f"{len(frame)} bytes, limit {MAX_MESSAGE_BYTES}")
    try:
        raw = json.loads(frame, parse_constant=_refuse_constant)
    except WireError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError("malformed", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError("malformed", f"expected a JSON object, got {type(raw).__name__}")
    job = raw.get("job") if isinstance(raw.get("job"), str) else None
    if raw.get("v") != PROTOCOL_VERSION:
        raise WireError(
            "version", f"protocol version {raw.get('v')!r}, this side speaks {PROTOCOL_VERSION}",
            job,
        )
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        code = "nonfinite" if first["type"] == "finite_number" else "invalid"
        detail = f"{where}: {first['msg']} (got {first.get('input')!r:.80})"
        if first["type"] == "extra_forbidden":
            detail += (f"; a field this side (trimtab {_release()}) does not know: a peer "
                       "from a newer trimtab? Upgrade the older side")
        raise WireError(code, detail, job) from None


def _release() -> str:
    """This side's trimtab release, for an error that may be a version skew."""
    try:
        return _metadata.version("trimtab")
    except _metadata.PackageNotFoundError:
        return "unknown"


def shard_of(job: str, endpoints: list[str] | tuple[str, ...]) -> str:
    """The endpoint, of ``endpoints``, whose controller serves ``job`` when jobs are sharded
    across controllers: rendezvous (highest-random-weight) hashing, each endpoint scoring
    the first 8 bytes (big-endian) of ``sha256(endpoint + "\\n" + job)``, the highest
    winning. The client (``shard_endpoint``) and ``trimtab set`` and the like use it alike.

    >>> shard_of("gpt-small", ["tcp://ctl-a:5555", "tcp://ctl-b:5555", "tcp://ctl-c:5555"])
    'tcp://ctl-c:5555'
    """
    def score(endpoint: str) -> int:
        digest = hashlib.sha256(f"{endpoint}\n{job}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    return max(endpoints, key=score)


def finite_or_none(x: float | None) -> float | None:
    """``x`` if it is a finite number, else ``None`` (for building reports)."""
    return x if x is not None and math.isfinite(x) else None
