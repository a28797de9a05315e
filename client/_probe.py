"""The on-device probe: per-step signals kept on the device, read once per report window.

Each step writes one row of a preallocated ``[report_every, F]`` float32 buffer
with device ops only (no ``.item()``, no host copy), so probing never waits
for the device. At the end of a window :meth:`Probe.collect` does the one
device-to-host copy and reduces the rows to :class:`WindowStats` on the host (on CUDA
that copy may have been queued earlier by :meth:`Probe.stage`, ahead of a snapshot's
copies, and ``collect`` then waits for it alone).

Row layout: loss, global grad norm (before clipping), one grad norm per param
group, then the update ratio (written on the window's last step only, else NaN), the
squared micro-batch gradient norm (written on steps whose loop reported micro-batches
through ``Guard.note_micro_batch``, else NaN) and the ``found_inf`` of a ``GradScaler``
that drove the step (written when one did, else NaN), and the update alignment (written
on a window's first step only, else NaN).
Finiteness is not stored: the host sees NaN and inf in the copied values.

A ``GradScaler`` stepping an optimizer that takes ``found_inf`` itself (a fused one)
calls ``optimizer.step()`` on its overflow steps too, and the fused kernel skips them.
Such a row is the scaler's, not a fault: :meth:`Probe.collect` leaves it out of the
gradient statistics and the non-finite counts, and counts it in
``WindowStats.scaler_skips``. (A scaler does not call a non-fused optimizer's ``step()``
on an overflow at all, so no row is written for it.)

A loop that clips its own gradients (``clip_grad_norm_`` before the guard sees them, as
under ``hooks=True`` or in a trainer) leaves clipped steps with a norm *at* its threshold:
``clip_grad_norm_`` scales to ``max_norm x n / (n + 1e-6)``, the same number to about
1e-6 whatever ``n`` was. :meth:`Probe.collect` finds that ceiling on the host -- three
steps of one window, or two in each of two windows, sharing the window's largest norm --
and counts the steps at it (``WindowStats.user_clipped_steps``): their norms are the
clip, not the gradient's, and the controller's noise-reading policies leave them out.

The update alignment is the cosine between the gradient at a window's first step and the
opposite of the update the previous window's last step made, ``cos(g_t, -dtheta_{t-1})``:
the sign of the hypergradient, d loss / d lr (Baydin et al. 2018, "Online Learning Rate
Adaptation with Hypergradient Descent"). Clearly positive, consecutive steps keep going the
same way and a larger LR would have gone further down: the LR is too low; near zero or
negative, the steps overshoot along the sharp directions, as at a tuned LR. It reuses the
update kept for the update ratio (one more step, then freed; scaled and added to in
place, so no new tensor of the model's size) and costs two ``foreach`` norms, a scale and
an add once per window (a scale per dtype where the weights mix them, e.g. fp32 norms
beside bf16 weights); it is not measured on gradients spread over several devices.

Sharded parameters (FSDP2): with :attr:`Probe.sharding` set (see
:mod:`trimtab.client._sharded`) the probe works on this rank's shards and turns local
norms into global ones with one all-reduce of their squares per step. The alignment
takes one more, once per window: each rank's dot product of its shards and the squared
norms, summed (:meth:`Probe._sharded_alignment`; every rank reaches it whatever its
shards hold).

>>> import torch
>>> p = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.SGD([p], lr=0.1)
>>> probe = Probe(opt, report_every=2, device=p.device)
>>> p.grad = torch.full((3,), 2.0)
>>> grads = probe.grads()
>>> norm = probe.measure(torch.tensor(1.5), grads)
>>> probe.advance()
>>> stats = probe.collect()
>>> stats.loss_mean, round(stats.grad_norm_mean, 4)
(1.5, 3.4641)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["Probe", "WindowStats", "Grads"]

_LOSS, _NORM, _GROUPS = range(3)

#: Gradients per param group, each split by device (foreach kernels want one device).
Grads = list[dict[torch.device, list[torch.Tensor]]]


@dataclass(frozen=True)
class WindowStats:
    """One window's signals, reduced on the host. Statistics skip non-finite values."""

    steps: int
    loss_mean: float | None = None
    loss_last: float | None = None
    loss_min: float | None = None
    loss_max: float | None = None
    grad_norm_mean: float | None = None
    grad_norm_max: float | None = None
    grad_norm_std: float | None = None
    group_grad_norms: list[float] = field(default_factory=list)
    update_ratio: float | None = None
    #: ``cos(g, -dtheta)`` of the window's first step's gradient and the update before it.
    update_alignment: float | None = None
    #: Mean over the window's steps of ``micro_batches**2 * |first micro-batch grad|^2``.
    micro_sq_norm_mean: float | None = None
    nonfinite_losses: int = 0
    nonfinite_grads: int = 0
    #: Steps a ``GradScaler`` skipped for an overflow (its ``found_inf``): not faults.
    scaler_skips: int = 0
    #: Steps whose norm sat at the loop's own clipping threshold, and that threshold.
    user_clipped_steps: int = 0
    user_clip: float | None = None


def _at_top(norms: list[float]) -> tuple[float, int]:
    """The largest norm and how many steps share it (within float32 rounding and
    ``clip_grad_norm_``'s 1e-6)."""
    top = max(norms)
    tol = 1e-6 + 4e-6 * top
    return top, sum(1 for x in norms if top - x <= tol)


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """Each tensor's 2-norm as a float32 scalar on its device: one ``_foreach_norm``,
    accumulated in float32 (half-precision gradients never overflow it). ``dtype=float32``
    refuses to narrow float64 tensors (a model in ``.double()``: a trial's loop crashed at
    its first step): those are normed in float64, then cast, one op each. A sparse gradient
    (``nn.Embedding(sparse=True)`` under SparseAdam, SGD or Adagrad: a trial's loop crashed
    at its first step, no sparse kernel for the norm) is normed through its coalesced
    values (duplicates summed first, as the optimizer applies them)."""
    if any(t.is_sparse for t in tensors):
        return [_dense_norm(t.coalesce().values() if t.is_sparse else t) for t in tensors]
    try:
        return torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
    except RuntimeError:
        if not any(t.dtype == torch.float64 for t in tensors):
            raise
        return [_dense_norm(t) for t in tensors]


def _dense_norm(t: torch.Tensor) -> torch.Tensor:
    """One tensor's 2-norm as a float32 scalar (a float64 one normed in float64, then cast)."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, 2.0).float()
    return torch.linalg.vector_norm(t, 2.0, dtype=torch.float32)


def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The squared 2-norm of ``tensors`` together, in float32 on their device."""
    return torch.stack(_norms(tensors)).square().sum()


class Probe:
    """Per-step gradient and loss signals for one optimizer, kept on ``device``."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, report_every: int, device: torch.device
    ) -> None:
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.groups = len(optimizer.param_groups)
        self._ratio_col = _GROUPS + self.groups
        self.buf = torch.full(
            (report_every, self._ratio_col + 4), math.nan, dtype=torch.float32,
            device=self.device,
        )
        # Per-row views of the columns a step writes, made once: one stack(out=) per step;
        # and of their parts (the loss; the total, then each group's norm; the total).
        self._rows = [self.buf[i, : self._ratio_col] for i in range(report_every)]
        self._views = [(r[_LOSS], r[_NORM: self._ratio_col], r[_NORM]) for r in self._rows]
        self._micro_col = self._ratio_col + 1
        self._scaler_col = self._ratio_col + 2
        self._align_col = self._ratio_col + 3
        #: The last window's sampled update (the params and their deltas) and its norm,
        #: kept for the next step's alignment; None: none to measure.
        self._update: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None
        #: The row the next step writes; also the number of steps in the open window.
        self.row = 0
        self._zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self._before: list[torch.Tensor] = []
        self._params: list[torch.Tensor] = []
        #: The parameters snapshotted, as the optimizer holds them (DTensors when sharded:
        #: their ``.grad`` is where the next gradient lands).
        self._sources: list[torch.Tensor] = []
        self._one_device = all(
            p.device == self.device for g in optimizer.param_groups for p in g["params"])
        #: Sharded parameters: this rank's shards and global norms (``_sharded.ShardNorms``);
        #: ``None``: every tensor is whole on this rank.
        self.sharding: Any = None
        #: The threshold the loop clips its gradients to itself (None: none seen), and the
        #: last window's largest norm shared by two steps (a ceiling seen once).
        self.user_clip: float | None = None
        self._maybe_clip: float | None = None
        #: On CUDA, a pinned host copy of the rows for :meth:`stage`, made here (not on a
        #: step), and the staged read in flight: (rows, event).
        self._host_rows = (torch.empty(self.buf.shape, dtype=self.buf.dtype, pin_memory=True)
                           if self.device.type == "cuda" else None)
        self._staged: tuple[int, Any] | None = None
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # see _mask
        #: Every gradient :meth:`measure` measured, in one list, when they are all on the
        #: probe's device (for the clip's one foreach call); ``None``: see ``grads``.
        self.flat: list[torch.Tensor] | None = None

    @property
    def full(self) -> bool:
        """Whether the next row written closes the window."""
        return self.row == self.buf.shape[0] - 1

    def grads(self) -> Grads:
        """This step's gradients, per group and device (params without a grad are left out)."""
        groups = self.optimizer.param_groups
        if self.sharding is not None:
            return self.sharding.grads(groups, self.device)
        if self._one_device:  # the common case, without a per-parameter device lookup
            dev = self.device
            return [{dev: [p.grad for p in g["params"] if p.grad is not None]} for g in groups]
        out: Grads = []
        for group in groups:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
            out.append(by_device)
        return out

    def _group_norm(self, by_device: dict[torch.device, list[torch.Tensor]]) -> torch.Tensor:
        # Same reduction as torch.nn.utils.get_total_norm: per-tensor norms, then their norm.
        norms: list[torch.Tensor] = []
        for grads in by_device.values():
            if not grads:
                continue
            per_tensor = _norms(grads)
            norm = torch.linalg.vector_norm(torch.stack(per_tensor))
            norms.append(norm if norm.device == self.device else norm.to(self.device))
        if not norms:
            return self._zero
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    def _group_norms(self, grads: Grads) -> list[torch.Tensor]:
        """Each group's gradient norm, on the device.

        With every gradient on the probe's device (the common case): one ``_foreach_norm``
        over all groups' gradients and one ``stack`` of the per-tensor norms, then each
        group's slice reduced; a single group is exactly ``get_total_norm``'s reduction.
        Per group and device otherwise (several devices, sharded parameters).
        """
        dev = self.device
        if not self._one_device or self.sharding is not None:
            return [self._group_norm(g) for g in grads]
        lists = [g.get(dev, []) for g in grads]
        flat = lists[0] if len(lists) == 1 else [t for gs in lists for t in gs]
        if not flat:
            return [self._zero] * len(lists)
        per_tensor = torch.stack(_norms(flat))
        if len(lists) == 1:
            return [torch.linalg.vector_norm(per_tensor)]
        counts = [len(gs) for gs in lists]
        return [torch.linalg.vector_norm(part) if n else self._zero
                for part, n in zip(per_tensor.split(counts), counts, strict=True)]

    def measure(self, loss: torch.Tensor | float, grads: Grads,
                grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Write this step's row; return the global grad norm before clipping (on device).

        ``grad_scale``: the gradients are still multiplied by it (a ``GradScaler`` handed
        the unscaling to a fused optimizer's kernel); the norms are divided by it, so that
        they are the unscaled gradients' (device ops; the gradients are left as they are).
        """
        self.flat = None
        if grad_scale is None and self._one_device and self.sharding is None:
            total = self._measure_fast(loss, grads)
            if total is not None:
                if self._update is not None:
                    self._alignment()
                return total
        group_norms = self._group_norms(grads)
        if self.sharding is not None:  # each rank holds a part of every gradient
            group_norms = self.sharding.global_norms(group_norms)
        if grad_scale is not None:
            scale = grad_scale.to(self.device, torch.float32, non_blocking=True)
            group_norms = [n / scale for n in group_norms]
        if len(group_norms) == 1:
            total = group_norms[0]
        else:
            total = torch.linalg.vector_norm(torch.stack(group_norms))
        if isinstance(loss, torch.Tensor):
            loss32 = loss.detach()
            if loss32.dim():
                loss32 = loss32.reshape(())
            if loss32.dtype != torch.float32 or loss32.device != self.device:
                loss32 = loss32.to(self.device, torch.float32, non_blocking=True)
        else:
            loss32 = torch.full((), float(loss), dtype=torch.float32, device=self.device)
        # Groups added after attach() count in the total (and clipping) but get no column.
        torch.stack([loss32, total, *group_norms[: self.groups]], out=self._rows[self.row])
        if self._update is not None:
            self._alignment()
        return total

    def _measure_fast(self, loss: torch.Tensor | float, grads: Grads) -> torch.Tensor | None:
        """:meth:`measure` with every gradient whole on the probe's device (the common
        case), in as few ops as the row allows: one ``_foreach_norm`` over every group's
        gradients and a ``stack``; then one ``vector_norm`` writes the total and each
        group's norm straight into the row (several groups: over the per-tensor norms
        times a 0/1 mask, the total's row all ones, made once per grouping); and one copy
        of the loss. ``None``: no gradient at all (the general path writes zeros).

        The total is the norm of every per-tensor norm, ``get_total_norm``'s reduction
        over all the optimizer's gradients (with several groups it may differ from the
        norm of the group norms in the last bit)."""
        dev = self.device
        lists = [g.get(dev, []) for g in grads]
        flat = lists[0] if len(lists) == 1 else [t for gs in lists for t in gs]
        if not flat:
            return None
        self.flat = flat
        loss_at, norms, total = self._views[self.row]
        with torch.no_grad():  # the loss is part of a graph: its copy is not
            per_tensor = torch.stack(_norms(flat))
            if len(lists) == 1 and self.groups == 1:
                torch.linalg.vector_norm(per_tensor.expand(2, -1), dim=1, out=norms)
            else:
                torch.linalg.vector_norm(per_tensor * self._mask(lists), dim=1, out=norms)
            if not isinstance(loss, torch.Tensor):
                loss_at.fill_(float(loss))
            else:  # copy_ converts dtype and device too
                loss_at.copy_(loss if loss.dim() == 0 else loss.reshape(()))
        return total

    def _mask(self, lists: list[list[torch.Tensor]]) -> torch.Tensor:
        """The 0/1 mask that picks, from the per-tensor norms, the total (row 0, all ones)
        and each group's (the groups a step's gradients fall in), on the device; made once
        per grouping (a handful at most: gradients that come and go between steps)."""
        counts = tuple(len(gs) for gs in lists)
        mask = self._masks.get(counts)
        if mask is None:
            rows = 1 + self.groups  # groups added after attach() count in the total only
            host = torch.zeros((rows, sum(counts)), dtype=torch.float32)
            host[0] = 1.0
            start = 0
            for i, n in enumerate(counts):
                if i < self.groups:
                    host[1 + i, start: start + n] = 1.0
                start += n
            if len(self._masks) >= 8:
                self._masks.clear()
            mask = self._masks[counts] = host.to(self.device, non_blocking=True)
        return mask

    def _alignment(self) -> None:
        """Write ``cos(g, -dtheta)`` of this step's gradients and the update kept by
        :meth:`update_ratio` into this row (device ops; see the module docstring). The kept
        update is scaled in place to the gradient's norm, ``d = dtheta |g| / |dtheta|``, and
        ``cos(g, -dtheta) = 1 - |g + d|^2 / (2 |g|^2)``: one norm of the sum, no dot-product
        loop over the tensors and no new tensor of the model's size."""
        params, delta, norm = self._update  # type: ignore[misc]
        self._update = None
        if self.sharding is not None:
            self._sharded_alignment(params, delta, norm)
            return
        grads = [p.grad for p in params]
        if any(g is None or g.shape != d.shape or g.dtype != d.dtype
               for g, d in zip(grads, delta, strict=True)):
            return
        with torch.no_grad():
            gn = torch.linalg.vector_norm(torch.stack(
                _norms(grads)))
            scale = gn / norm
            if len({d.dtype for d in delta}) == 1:
                torch._foreach_mul_(delta, scale.to(delta[0].dtype))
            else:  # mixed precision (fp32 norms beside bf16 weights): one scale per dtype
                for dtype in {d.dtype for d in delta}:
                    torch._foreach_mul_([d for d in delta if d.dtype == dtype],
                                        scale.to(dtype))
            torch._foreach_add_(delta, grads)  # type: ignore[arg-type]
            s = torch.linalg.vector_norm(torch.stack(
                _norms(delta)))
            cos = 1.0 - (s / gn) ** 2 / 2.0
            self.buf[self.row, self._align_col] = cos.clamp(-1.0, 1.0)

    def _sharded_alignment(self, params: list[torch.Tensor], delta: list[torch.Tensor],
                           norm: torch.Tensor) -> None:
        """:meth:`_alignment` for sharded parameters, with one all-reduce: each rank takes
        the dot product of its shards, ``g_r . dtheta_r``, by the same identity on its own
        scale (``c = |g_r| / |dtheta_r|``: ``|g_r + c dtheta_r|^2 = 2 |g_r|^2 + 2 c
        g_r . dtheta_r``), and the ranks sum ``[dot, |g|^2, |dtheta|^2, unmeasured]``. Every
        rank reaches the all-reduce whatever its shards hold (a rank with a missing or
        mismatched gradient adds to ``unmeasured``, and the alignment is then NaN on every
        rank): an early return on one rank alone would leave the others waiting in it."""
        grads = [None if p.grad is None else self.sharding.local(p.grad) for p in params]
        ok = bool(grads) and all(g is not None and g.shape == d.shape and g.dtype == d.dtype
                                 for g, d in zip(grads, delta, strict=True))
        with torch.no_grad():
            if ok:
                g2 = _sum_sq(grads)  # type: ignore[arg-type]
                scale = torch.where(norm > 0, g2.sqrt() / norm, torch.zeros_like(norm))
                for dtype in {d.dtype for d in delta}:
                    torch._foreach_mul_([d for d in delta if d.dtype == dtype], scale.to(dtype))
                torch._foreach_add_(delta, grads)  # type: ignore[arg-type]
                s2 = _sum_sq(delta)
                dot = torch.where(scale > 0, (s2 - 2.0 * g2) / (2.0 * scale), torch.zeros_like(s2))
                sums = torch.stack([dot, g2, norm.square(), torch.zeros_like(dot)])
            else:
                sums = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float32,
                                    device=self.device)
            sums = self.sharding.sum(sums)
            cos = -sums[0] / (sums[1] * sums[2]).sqrt()
            cos = torch.where(sums[3] > 0, torch.full_like(cos, math.nan), cos.clamp(-1.0, 1.0))
            self.buf[self.row, self._align_col] = cos

    def snapshot(self) -> None:
        """Copy the params about to be updated; called on the window's last step only."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._sources = params
        if self.sharding is not None:
            params = [self.sharding.local(p) for p in params]
        self._before = [p.detach().clone() for p in params]
        self._params = params

    def update_ratio(self) -> None:
        """Write ||delta theta|| / ||theta|| for the snapshotted step into the current row."""
        before, self._before = self._before, []
        if not before:
            return
        with torch.no_grad():
            after = [p.detach() for p in self._params]
            delta = torch._foreach_sub(after, before)
            dn = torch.stack(_norms(delta))
            wn = torch.stack(_norms(before))
            norms = [torch.linalg.vector_norm(n.to(self.device)) for n in (dn, wn)]
            if self.sharding is not None:
                norms = self.sharding.global_norms(norms)
            ratio = norms[0] / norms[1]
            # A skipped step's ratio says nothing of the step size; collect() drops it.
            self.buf[self.row, self._ratio_col] = ratio
            if self._one_device and delta:
                # Sharded: the DTensor parameters (the next gradient lands on them) and
                # this rank's own update norm (_sharded_alignment works per rank first).
                self._update = ((self._params, delta, norms[0]) if self.sharding is None else
                                (self._sources, delta, torch.linalg.vector_norm(dn)))
        self._params, self._sources = [], []

    def total_norm(self, grads: Grads) -> torch.Tensor:
        """The global norm of ``grads`` on the device, without writing a row."""
        norms = self._group_norms(grads)
        if self.sharding is not None:
            norms = self.sharding.global_norms(norms)
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    def note_micro(self, sq_norm: torch.Tensor) -> None:
        """Write this step's scaled squared micro-batch gradient norm (a device op)."""
        self.buf[self.row, self._micro_col].copy_(sq_norm)

    def note_scaler(self, found_inf: torch.Tensor) -> None:
        """Write a ``GradScaler``'s ``found_inf`` for this step (a device op): a row where
        it is set is the scaler's skip, not a fault."""
        self.buf[self.row, self._scaler_col].copy_(found_inf.reshape(()))

    def advance(self) -> None:
        """Move on to the next row (after :meth:`measure` and the optimizer step)."""
        self.row += 1

    def stage(self) -> None:
        """Queue the open window's rows for the host now, ahead of what is queued next (a
        snapshot's copies): :meth:`collect`'s read then waits for the step only, never for
        those copies. No sync here; nothing to do off CUDA."""
        if self._host_rows is None or self.row == 0:
            return
        n = self.row
        self._host_rows[:n].copy_(self.buf[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._staged = (n, done)

    def reset(self) -> None:
        """Discard the open window (after a rollback its rows describe an abandoned run)."""
        self.row = 0
        self._staged = None
        self.buf[:, self._ratio_col :].fill_(math.nan)
        self._before, self._params, self._update = [], [], None

    def skips_so_far(self) -> int:
        """Non-finite-grad steps in the open window. Reads the device: one sync, on demand."""
        if self.row == 0:
            return 0
        rows = self.buf[: self.row]
        bad = ~torch.isfinite(rows[:, _NORM]) & ~(rows[:, self._scaler_col] > 0)
        return int(bad.sum().item())  # sync, only when asked

    def collect(self) -> WindowStats:
        """Reduce the open window to host numbers and start a new one."""
        n, self.row = self.row, 0
        if n == 0:
            return WindowStats(steps=0)
        # THE one device->host copy (and sync) per report window.
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == n and self._host_rows is not None:
            staged[1].synchronize()  # the rows staged by stage(), behind the step only
            rows: list[list[float]] = self._host_rows[:n].tolist()
        else:
            rows = self.buf[:n].tolist()
        self.buf[:, self._ratio_col :].fill_(math.nan)
        losses = [r[_LOSS] for r in rows if math.isfinite(r[_LOSS])]
        # A GradScaler's overflow steps (its found_inf set): neither gradients nor faults.
        scaled = [r for r in rows if not r[self._scaler_col] > 0]
        ok_rows = [r for r in scaled if math.isfinite(r[_NORM])]
        norms = [r[_NORM] for r in ok_rows]
        last, ratio = rows[-1][_NORM], rows[-1][self._ratio_col]
        align = rows[0][self._align_col]
        if rows[-1][self._scaler_col] > 0:
            last = math.nan  # that step updated nothing: its ratio says nothing
        stats = WindowStats(
            steps=n,
            nonfinite_losses=n - len(losses),
            nonfinite_grads=len(scaled) - len(ok_rows),
            scaler_skips=n - len(scaled),
            update_ratio=ratio if math.isfinite(last) and math.isfinite(ratio) else None,
            update_alignment=align if math.isfinite(align) else None,
        )
        if losses:
            stats = replace(stats, loss_mean=_mean(losses), loss_last=losses[-1],
                            loss_min=min(losses), loss_max=max(losses))
        micro = [r[self._micro_col] for r in ok_rows if math.isfinite(r[self._micro_col])]
        if micro:
            stats = replace(stats, micro_sq_norm_mean=_mean(micro))
        if norms:
            mean = _mean(norms)
            std = math.sqrt(max(0.0, _mean([(x - mean) ** 2 for x in norms])))
            groups = [_mean([r[_GROUPS + i] for r in ok_rows]) for i in range(self.groups)]
            stats = replace(stats, grad_norm_mean=mean, grad_norm_max=max(norms),
                            grad_norm_std=std, group_grad_norms=groups)
            clip, at = self._ceiling(norms)
            if clip is not None:
                stats = replace(stats, user_clip=clip, user_clipped_steps=at)
        return stats

    def _ceiling(self, norms: list[float]) -> tuple[float | None, int]:
        """The loop's own clipping threshold as these norms show it, and the steps at it."""
        top, n = _at_top(norms)
        tol = 1e-6 + 4e-6 * top
        seen, self._maybe_clip = self._maybe_clip, (top if n >= 2 else None)
        if n >= 3 or (n == 2 and seen is not None and abs(top - seen) <= tol):
            self.user_clip = top
        elif self.user_clip is not None and top > self.user_clip + tol:
            self.user_clip = None  # a norm past it: the loop no longer clips there
        clip = self.user_clip
        if clip is None:
            return None, 0
        return clip, sum(1 for x in norms if abs(x - clip) <= 1e-6 + 4e-6 * clip)
