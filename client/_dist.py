"""Distributed training: one controller link per job, every rank in step.

Under an initialised ``torch.distributed`` process group of more than one rank (DDP
launched by ``torchrun``, say), every rank attaches its own guard and they act as one job:

* **One link.** Only rank 0 opens a transport (the ZeroMQ DEALER thread); the other ranks
  create no socket and no thread. The job registers once, reports once per window and
  acknowledges each command once.
* **Signals.** At each report boundary, one ``all_reduce`` (SUM, then divided by the world
  size) of the probe's open-window rows, on the probe's device, before the window's one
  host copy: the reported loss is the mean over ranks. Under DDP the gradients are already
  averaged across ranks, so every rank's gradient norm is the same and its mean is that
  norm. A NaN or inf on any rank stays non-finite in the sum, so a non-finite loss or
  gradient on any rank is counted in the report.
* **Commands.** At the same boundary rank 0 takes the newest command its transport thread
  has already received (it never waits for one) and broadcasts a fixed-size float64 header
  (:func:`encode_command`: the command's length in bytes, 0 for none, and rank 0's step);
  when there is a command, a second broadcast carries its wire frame as uint8 bytes (JSON,
  no pickle), which every rank, rank 0 included, decodes and validates as any frame from
  the controller. Every rank applies it at the start of its next ``guard.step()`` -- the
  same global step everywhere, since ranks step in lockstep. So a command applies at a
  report boundary, up to ``report_every`` steps later than in a single process. Only
  rank 0 acknowledges.
* **Rollback.** Every rank keeps its own checkpoints (host ring; with ``checkpoint_dir``,
  its files under ``rank-<r>`` there: see :func:`rank_directory`). A mark or a rollback
  reaches all ranks in the same broadcast, so all restore the same step from their own
  snapshots; DDP replicas are identical, so the restored parameters are identical too.
* **Sharded models** (FSDP2's ``fully_shard``: DTensor parameters). The gradient norm is
  made global with one all-reduce per step, checkpoints hold each rank's shards and go to
  DCP directories shared by all ranks: see :mod:`trimtab.client._sharded`.
* **Replicas.** At the same boundary every rank takes two checksums of its parameters
  (:func:`param_checksum`, on the device: their norms, and their bytes read as integers)
  and the ranks' highest and lowest travel with the window's lr range: the report's
  ``replicas_identical`` says whether the DDP replicas are identical bit for bit, and
  ``replica_spread`` how far apart their norms stand. A loop that writes its own lr on
  one rank only, or a device that corrupts a value silently, parts them for good; the
  controller judges that report unhealthy (cause ``replicas``) and rolls every rank back
  to a checkpoint they agreed at. Not taken for sharded models, whose ranks hold
  different shards by design.

Per report that is three small collectives (the rows; the window's lr range, a loop may
write its own lr on one rank only, with the replicas' checksums; the command header) and a
fourth only when a command is carried, and one host copy of each result; nothing per step.
A collective waits for every rank, as DDP's own gradient all-reduce does every step.
Every rank must attach with the same ``report_every`` and ``checkpoint_every``
(:meth:`DistLink.check_same` refuses otherwise) and step and close in lockstep.

Many jobs: :func:`shard_endpoint` picks a job's controller from a list, stably.

>>> from trimtab.protocol import wire
>>> cmd = wire.Command(job="demo", seq=3, scale=wire.ScaleTargets(lr=0.5), mark_stable=200)
>>> header, body = encode_command(cmd, step=240)
>>> header.tolist()[1], header.dtype, body.dtype
(240.0, torch.float64, torch.uint8)
>>> decode_command(bytes(body.tolist())) == cmd
True
>>> encode_command(None, step=240)[0].tolist()
[0.0, 240.0, 0.0, -1.0]
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trimtab.protocol import wire

from ._options import check_endpoint
from ._transport import Transport

__all__ = [
    "HEADER_SIZE",
    "DistLink",
    "param_checksum",
    "replicated_params",
    "RankTransport",
    "encode_command",
    "decode_command",
    "rank_directory",
    "shard_endpoint",
]

log = logging.getLogger("trimtab.client")

#: The header broadcast at every report boundary: the command's length in bytes (0: none),
#: rank 0's global step, and 1 when rank 0 hears no controller (0 when it does).
HEADER_SIZE = 4
#: Integers above this are not exact in a float64.
_EXACT = 2**53


def encode_command(command: wire.Command | None, step: int, alone: bool = False,
                   seen: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``command`` (``None``: no command) as a float64 header of :data:`HEADER_SIZE` values
    (its length in bytes, ``step``, ``alone``: no controller heard, ``seen``: the newest
    step the controller says it has seen, -1 for none) and a uint8 body: its wire frame
    (UTF-8 JSON)."""
    if not 0 <= step <= _EXACT:
        raise ValueError(f"step={step!r} cannot travel in the header; allowed: 0 to 2**53")
    raw = b"" if command is None else wire.encode(command)
    told = -1.0 if seen is None or not 0 <= seen <= _EXACT else float(seen)
    header = torch.tensor([float(len(raw)), float(step), float(alone), told],
                          dtype=torch.float64)
    return header, torch.tensor(list(raw), dtype=torch.uint8)


def decode_command(body: bytes) -> wire.Command | None:
    """The command in a body :func:`encode_command` made (``b""``: none), validated as any
    frame from the controller is; :class:`~trimtab.protocol.wire.WireError` if it is not one."""
    if not body:
        return None
    message = wire.decode(body)
    if not isinstance(message, wire.Command):
        raise wire.WireError("unexpected", f"expected a command, got a {message.type}")
    return message


def rank_directory(directory: str | os.PathLike | None, rank: int) -> Path | None:
    """Where rank ``rank`` keeps its checkpoint files: ``directory/rank-<rank>``.

    >>> str(rank_directory("ckpt", 3))
    'ckpt/rank-3'
    """
    return None if directory is None else Path(directory) / f"rank-{rank}"


def shard_endpoint(job: str, endpoints: Sequence[str]) -> str:
    """The controller endpoint, of ``endpoints``, that serves ``job``: stable and even.

    Rendezvous (highest-random-weight) hashing: each endpoint scores
    ``sha256(endpoint + "\\n" + job)``'s first 8 bytes (big-endian) and the highest wins.
    Every process, in any language, that knows the job id and the list finds the same
    controller; a job moves only when its own controller leaves the list, and adding an
    Nth controller moves about 1/N of the jobs, all to the new one. The order of
    ``endpoints`` does not matter.

    >>> eps = ["tcp://ctl-a:5555", "tcp://ctl-b:5555", "tcp://ctl-c:5555"]
    >>> shard_endpoint("gpt-small", eps), shard_endpoint("gpt-large", eps)
    ('tcp://ctl-c:5555', 'tcp://ctl-b:5555')
    >>> shard_endpoint("gpt-small", eps[::-1])
    'tcp://ctl-c:5555'
    """
    try:
        wire.Heartbeat(job=job)
    except Exception:
        raise ValueError(
            f"job={job!r} is invalid; allowed: 1-128 characters of A-Za-z0-9_.:@/-"
        ) from None
    if isinstance(endpoints, str) or not endpoints:
        raise ValueError(
            f"endpoints={endpoints!r} is invalid; allowed: a non-empty list of endpoint strings"
        )
    bad = [e for e in endpoints if not isinstance(e, str) or not e]
    if bad or len(set(endpoints)) != len(endpoints):
        what = f"{bad[0]!r}" if bad else "a duplicate"
        raise ValueError(
            f"endpoints={list(endpoints)!r} is invalid ({what}); allowed: "
            "distinct, non-empty endpoint strings"
        )
    for i, endpoint in enumerate(endpoints):
        check_endpoint(endpoint, f"endpoints[{i}]")
    return wire.shard_of(job, list(endpoints))


def replicated_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters DDP keeps identical on every rank: all of ``model``'s but those a
    module told DDP to leave alone (``DistributedDataParallel.
    _set_params_and_buffers_to_ignore_for_model``), which each rank may hold its own of."""
    skip: set[int] = set()
    for m in model.modules():
        names = getattr(m, "_ddp_params_and_buffers_to_ignore", None)
        if names:
            own = dict(m.named_parameters())
            skip.update(id(own[n]) for n in names if n in own)
    return [p for p in model.parameters() if id(p) not in skip]


def _norm(p: torch.Tensor) -> torch.Tensor:
    """``p``'s 2-norm, in float32 or better (float64 stays float64; complex as its parts)."""
    if p.is_complex():
        p = torch.view_as_real(p)
    if not p.is_floating_point():
        p = p.double()
    return torch.linalg.vector_norm(p, dtype=torch.promote_types(p.dtype, torch.float32))


#: Integer views of a parameter's bytes, by element size.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: The bit sum is taken modulo this, so that float64 carries it exactly.
_BITS_MOD = 2**52


def _bits(p: torch.Tensor) -> torch.Tensor:
    """The sum of ``p``'s elements read as integers of their width (int64, wrapping)."""
    if p.is_complex():
        p = torch.view_as_real(p)
    p = p.contiguous()
    return p.view(_BITS[p.element_size()]).sum(dtype=torch.int64)


def param_checksum(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Two float64 checksums of ``params`` on their device, read by no one until the
    window's reduction (no host sync): the sum of each tensor's 2-norm (float32 or
    better), whose spread over ranks says how far apart they are, and the sum of their
    bytes read as integers, modulo 2**52, which any change of any element's bits moves (a
    sign flip, a 1e-3 nudge of one weight, a bit a device flipped; all but two changes that
    cancel exactly). Identical replicas give identical checksums (the same kernels on the
    same bytes). None for no parameters. A loop over the parameters, once per report
    window, never per step.

    >>> c = param_checksum([torch.tensor([3.0, 4.0]), torch.ones(1, dtype=torch.float64),
    ...                     torch.tensor([1j]), torch.ones(4, dtype=torch.bfloat16)])
    >>> c[0].item()
    9.0
    >>> flipped = param_checksum([torch.tensor([-3.0, 4.0]), torch.ones(1, dtype=torch.float64),
    ...                           torch.tensor([1j]), torch.ones(4, dtype=torch.bfloat16)])
    >>> flipped[0].item() == c[0].item(), flipped[1].item() == c[1].item()
    (True, False)
    """
    params = [p.detach() for p in params]
    if not params:
        return None
    device = params[0].device
    norms = torch.stack([_norm(p).to(device) for p in params]).double().sum()
    bits = torch.stack([_bits(p).to(device) for p in params]).sum()
    return torch.stack([norms, torch.remainder(bits, _BITS_MOD).double()])


class RankTransport:
    """What a rank's guard sees as its transport: rank 0's real one, or nothing.

    Commands come from the last broadcast (:meth:`DistLink.exchange`), never straight
    from the socket, so every rank takes the same one at the same step.
    """

    def __init__(self, link: DistLink, inner: Transport | None) -> None:
        self._link = link
        #: Rank 0's transport; ``None`` on every other rank.
        self.inner = inner

    def start(self) -> None:
        if self.inner is not None:
            self.inner.start()

    def put_report(self, report: wire.Report | wire.Validation) -> None:
        if self.inner is not None:
            self.inner.put_report(report)

    @property
    def last_report(self) -> tuple[float, int] | None:
        return None if self.inner is None else self.inner.last_report

    def put_control(self, message: wire.Ack) -> None:
        if self.inner is not None:  # one ack per job: rank 0's
            self.inner.put_control(message)

    def reregister(self) -> None:
        if self.inner is not None:
            self.inner.reregister()

    def send_late(self, message: wire.Validation) -> None:
        """Rank 0 sends it (one result per job); other ranks have no link."""
        if self.inner is not None:
            self.inner.send_late(message)

    def take_command(self) -> wire.Command | None:
        command, self._link.pending = self._link.pending, None
        return command

    @property
    def dropped(self) -> int:
        return 0 if self.inner is None else self.inner.dropped

    @property
    def bad_frames(self) -> int:
        return 0 if self.inner is None else self.inner.bad_frames

    @property
    def connected(self) -> bool:
        """Rank 0: whether the controller was heard from; other ranks have no link: False."""
        return self.inner is not None and self.inner.connected

    @property
    def link(self) -> int:
        """Rank 0: its transport's link; other ranks: 0 (they build no report)."""
        return 0 if self.inner is None else self.inner.link

    @property
    def offline(self) -> bool:
        """Rank 0: whether no controller was heard for a liveness window; other ranks: False
        (they build no report)."""
        return self.inner is not None and self.inner.offline

    def close(self, bye: wire.Bye | None = None, timeout_s: float = 1.0) -> None:
        if self.inner is not None:
            self.inner.close(bye, timeout_s)


class DistLink:
    """This rank's part in a distributed job: its rank, the group and the collectives.

    Made by :meth:`detect`; the guard calls :meth:`reduce_rows` and :meth:`exchange` at
    every report boundary, on every rank.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.group = group
        self._src = 0 if group is None else dist.get_global_rank(group, 0)
        #: The command of the last broadcast, until the guard takes it.
        self.pending: wire.Command | None = None
        #: Whether rank 0 heard no controller at the last exchange (every rank holds a live
        #: lr schedule alike: see :class:`~trimtab.client._knobs.Actuator`).
        self.alone = False
        #: The newest step the controller had seen at the last exchange, as rank 0 was told
        #: (None: not told): every rank holds a live lr schedule at the same leash.
        self.seen: int | None = None
        self._transport: Transport | None = None
        self._warned = False

    @classmethod
    def detect(cls, device: torch.device) -> DistLink | None:
        """A link when a default process group of more than one rank is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size()
        if world < 2:
            return None
        backend = str(dist.get_backend())
        if device.type == "cpu" and "gloo" not in backend and "mpi" not in backend:
            raise ValueError(
                f"process group backend={backend!r} cannot reduce the probe's "
                "tensors on device cpu; allowed: a backend with CPU support "
                "(gloo, mpi), or parameters on the backend's device"
            )
        return cls(dist.get_rank(), world, device)

    def check_same(self, **options: int) -> None:
        """Raise on every rank unless every rank passed the same ``options`` (one collective)."""
        names = list(options)
        values = [float(options[n]) for n in names]
        t = torch.tensor(
            [x for v in values for x in (v, -v)], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        for i, name in enumerate(names):
            high, low = t[2 * i].item(), -t[2 * i + 1].item()
            if high != low:
                raise ValueError(
                    f"{name} differs across ranks (from {low:g} to {high:g}; this rank "
                    f"{options[name]!r}); allowed: the same value on every rank"
                )

    def transport(self, make: Callable[[], Transport]) -> RankTransport:
        """Rank 0's transport made with ``make``; on other ranks, none (no socket)."""
        self._transport = make() if self.rank == 0 else None
        return RankTransport(self, self._transport)

    def reduce_rows(self, rows: torch.Tensor) -> None:
        """Replace the window's probe rows, in place, by their mean over ranks."""
        if rows.numel() == 0:
            return
        try:
            dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=self.group)
            rows.div_(self.world_size)
        except Exception:  # a broken group is the training loop's to report, not ours
            self._warn(
                "could not reduce a report window across ranks; reporting this rank's own values"
            )

    def reduce_window(
        self, lr_range: tuple[float | None, float | None],
        checksum: torch.Tensor | None = None,
    ) -> tuple[tuple[float | None, float | None], float | None, bool | None]:
        """The lowest and highest lr any rank's steps were given in the window, how far
        apart the ranks' parameter norms stand and whether their bytes are identical
        (:func:`param_checksum`; None, None: none given, on any rank): one small
        ``all_reduce``, MAX, of seven float64 values, read once on the host. A loop that
        writes its own lr on one rank only must not report rank 0's alone; and a replica
        whose parameters left the others' (that lr on one rank, a silent data corruption
        on one device) is no longer the model the report speaks of. The spread is
        ``(max - min) / max(|max|, |min|)`` of the norm sums over ranks: 0 while the DDP
        replicas are identical, as they are bit for bit after every step."""
        lo, hi = lr_range
        # The last value says a rank took no checksum: then none is compared.
        t = torch.tensor([-math.inf if hi is None else hi, -math.inf if lo is None else -lo,
                          0.0, 0.0, 0.0, 0.0, 1.0 if checksum is None else 0.0],
                         dtype=torch.float64, device=self.device)
        if checksum is not None:
            c = checksum.to(device=self.device, dtype=torch.float64).reshape(2)
            # NaN as +inf: a MAX over a NaN differs with the order the ranks meet in, and
            # an infinite highest norm means no comparison on every rank alike.
            c = torch.nan_to_num(c, nan=math.inf)
            t[2:6] = torch.stack([c[0], -c[0], c[1], -c[1]])  # no host read before it
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        except Exception:  # a broken group is the training loop's to report, not ours
            self._warn("could not reduce a report window's lr range across ranks; reporting "
                       "this rank's own")
            return lr_range, None, None
        top, neg_low, high, neg_least, bits_high, neg_bits_low, missing = t.tolist()
        lr = (None if math.isinf(neg_low) else -neg_low, None if math.isinf(top) else top)
        if missing:  # this rank's, or another's
            return lr, None, None
        least = -neg_least
        if not (math.isfinite(high) and math.isfinite(least)):
            # Non-finite parameters: counted by the non-finite checks, not compared here.
            return lr, None, None
        scale = max(abs(high), abs(least))
        spread = 0.0 if high == least else (high - least) / scale
        return lr, spread, bits_high == -neg_bits_low and high == least

    def exchange(self, step: int) -> None:
        """Broadcast rank 0's newest command; every rank keeps it in :attr:`pending`.

        ``step`` is this rank's global step: rank 0 sends its own, the others check theirs
        against it (ranks out of lockstep are logged, once).
        """
        own = None if self._transport is None else self._transport.take_command()
        alone = self._transport is not None and not self._transport.connected
        seen = None if self._transport is None else self._transport.controller_step
        header, body = encode_command(own, step, alone, seen)
        try:
            header = header.to(self.device)
            dist.broadcast(header, src=self._src, group=self.group)
            size, step0, alone0, seen0 = header.tolist()  # a host copy (a sync), per report
            self.alone = bool(alone0)
            self.seen = None if seen0 < 0 else int(seen0)
            if size:  # a second broadcast only when there is a command
                if self.rank != 0:
                    body = torch.empty(int(size), dtype=torch.uint8)
                body = body.to(self.device)
                dist.broadcast(body, src=self._src, group=self.group)
                # Every rank, rank 0 included, applies what it decodes: the same command.
                self.pending = decode_command(bytes(body.tolist()))
        except Exception:
            self._warn("could not broadcast a command across ranks; none applied")
            return
        if step0 != step:
            self._warn(
                f"rank {self.rank} is at step {step} where rank 0 is at {int(step0)}: "
                "ranks are out of lockstep",
                exc_info=False,
            )

    def _warn(self, message: str, exc_info: bool = True) -> None:
        if not self._warned:
            self._warned = True
            log.error("trimtab: %s", message, exc_info=exc_info)
