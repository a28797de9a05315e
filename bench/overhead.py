"""Client overhead: step time of a training loop attached to a live controller vs bare.

    python -m bench.overhead [--models mlp,transformer,wide_mlp] [--repeats 7] [--steps 200]
                             [--device cpu|cuda]

Models: ``mlp`` (85K parameters, SGD), ``transformer`` (a 2-layer character transformer,
AdamW) and ``wide_mlp`` (4.7M parameters, SGD). ``python -m bench run`` runs the same
measurement as its ``overhead`` scenario.

For each model, bare and attached runs alternate (bare, attached, bare, ...) so drift
in the machine hits both alike; each run times ``--steps`` steps after a warm-up. The
printed ratio is the median over pairs of (attached median step time / bare median step
time). The controller is a real ``trimtab serve`` subprocess on loopback, running its
default policies, so the client's transport thread is doing real work during the timing.

On CUDA the attached loop also runs under ``torch.cuda.set_sync_debug_mode("warn")`` on
non-report steps and the number of synchronizing calls is printed (zero expected).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

from bench._serve import Controller
from trimtab.client import attach


class TinyTransformer(torch.nn.Module):
    """A character-level causal transformer (2 layers, d=128, 4 heads, context 64)."""

    def __init__(self, vocab: int = 96, d: int = 128, layers: int = 2, ctx: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(ctx, d))
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True))


#: MLP models: (input width, hidden width, batch). ``wide_mlp`` is the larger model:
#: 4.7M parameters, 56x the ``mlp``'s 85K.
_MLPS = {"mlp": (64, 256, 128), "wide_mlp": (256, 2048, 256)}


def _mlp_task(d_in: int, hidden: int, size: int, device: str, g: torch.Generator):
    model = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10))
    x = torch.randn(4096, d_in, generator=g).to(device)
    y = torch.randint(0, 10, (4096,), generator=g).to(device)

    def batch():
        i = torch.randint(0, 4096, (size,), generator=g).to(device)
        return x[i], y[i]

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    return model.to(device), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), batch, loss_fn


def make_task(name: str, device: str, seed: int):
    """(model, optimizer factory, batch function, loss function) for one benchmark model."""
    torch.manual_seed(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if name in _MLPS:
        return _mlp_task(*_MLPS[name], device, g)
    if name == "transformer":
        import inspect

        text = inspect.getsource(torch.nn.modules.transformer).encode("ascii", "replace")
        data = torch.tensor([min(max(c - 32, 0), 95) for c in text], dtype=torch.long).to(device)
        model = TinyTransformer()

        def batch():
            i = torch.randint(0, len(data) - 65, (16,), generator=g).to(device)
            seq = torch.stack([data[j: j + 65] for j in i.tolist()])
            return seq[:, :-1], seq[:, 1:]

        def loss_fn(m, b):
            return torch.nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())

        return model.to(device), lambda p: torch.optim.AdamW(p, lr=3e-4), batch, loss_fn
    raise ValueError(f"unknown model {name!r}")


def timed_run(name: str, device: str, steps: int, warmup: int, seed: int,
              endpoint: str | None, report_every: int) -> tuple[float, float, int]:
    """Median iteration time (s) of one run, median time of the step call alone (s), and
    synchronizing calls seen on non-report steps."""
    model, make_opt, batch, loss_fn = make_task(name, device, seed)
    opt = make_opt(model.parameters())
    batches = [batch() for _ in range(16)]
    guard = None
    if endpoint is not None:
        guard = attach(model, opt, job=f"overhead-{name}-{os.getpid()}", endpoint=endpoint,
                       report_every=report_every)
    times, step_times, syncs = [], [], 0
    cuda = device.startswith("cuda")
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check = cuda and guard is not None and (i + 1) % report_every != 0 and i >= warmup
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if check:
                torch.cuda.set_sync_debug_mode("warn")
            t1 = time.perf_counter()
            if guard is None:
                opt.step()
            else:
                guard.step(loss)
            t2 = time.perf_counter()
            if check:
                torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
        if cuda:
            torch.cuda.synchronize()  # timing only: bare and attached pay it alike
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            step_times.append(t2 - t1)
    if guard is not None:
        guard.close()
    return statistics.median(times), statistics.median(step_times), syncs


def measure(models: list[str], repeats: int = 7, steps: int = 200, warmup: int = 20,
            report_every: int = 10, device: str = "cpu", seed: int = 0,
            log=None) -> list[tuple]:
    """One row per model: ``(name, bare median step s, attached median step s, ratio
    median, ratio min, ratio max, guard.step - optimizer.step median s, syncs)``, against
    a fresh ``trimtab serve`` with its default policies."""
    with tempfile.TemporaryDirectory() as tmp:
        ctl = Controller(tmp)
        endpoint = ctl.endpoint
        try:
            rows = []
            for name in models:
                ratios, bare_t, att_t, added, syncs = [], [], [], [], 0
                for r in range(repeats):
                    # ABBA order: a drift in machine speed hits bare and attached alike.
                    order = (None, endpoint) if r % 2 == 0 else (endpoint, None)
                    res = {ep: timed_run(name, device, steps, warmup, seed + r, ep,
                                         report_every) for ep in order}
                    (b, b_step, _), (a, a_step, s) = res[None], res[endpoint]
                    ratios.append(a / b)
                    bare_t.append(b)
                    att_t.append(a)
                    added.append(a_step - b_step)
                    syncs += s
                rows.append((name, statistics.median(bare_t), statistics.median(att_t),
                             statistics.median(ratios), min(ratios), max(ratios),
                             statistics.median(added), syncs))
                if log is not None:
                    log(f"overhead {name}: ratio {rows[-1][3]:.3f}")
        finally:
            ctl.stop()
    return rows


def format_table(rows: list[tuple], repeats: int, steps: int, warmup: int,
                 report_every: int, device: str, seed: int) -> str:
    """The printed table, with the machine and settings."""
    lines = [
        f"# client overhead: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {device}, python {platform.python_version()}",
        f"# report_every={report_every} steps={steps} warmup={warmup} "
        f"repeats={repeats} seeds={seed}..{seed + repeats - 1}",
        "| model | bare step (ms) | attached step (ms) | ratio (median) | ratio range "
        "| guard.step - optimizer.step (us) | syncs on non-report steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b, a, r, lo, hi, add, s in rows:
        sync = str(s) if device.startswith("cuda") else "n/a on cpu"
        lines.append(f"| {name} | {b * 1e3:.3f} | {a * 1e3:.3f} | {r:.3f} | {lo:.3f}-{hi:.3f} "
                     f"| {add * 1e6:.0f} | {sync} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,transformer,wide_mlp")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = measure(args.models.split(","), args.repeats, args.steps, args.warmup,
                   args.report_every, args.device, args.seed)
    print(format_table(rows, args.repeats, args.steps, args.warmup, args.report_every,
                       args.device, args.seed))
    if any(math.isnan(r[3]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
