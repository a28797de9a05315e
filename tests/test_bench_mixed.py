"""bench.mixed runs end to end and prints a row per setup (timings are printed there,
never asserted)."""

from __future__ import annotations

import math
import re

import pytest

from bench import mixed


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_prints_a_row_per_setup_with_finite_numbers(capsys):
    mixed.main(["--repeats", "1", "--steps", "3", "--warmup", "1", "--backend", "aot_eager"])
    out = capsys.readouterr().out
    for setup in mixed.SETUPS:
        row = re.search(rf"^\| {setup} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", out, re.M)
        assert row, out
        assert all(math.isfinite(float(x)) and float(x) > 0 for x in row.groups())


def test_unknown_setup_is_refused(capsys):
    with pytest.raises(SystemExit):
        mixed.main(["--setups", "fp8"])
    assert "--setups='fp8' is invalid; allowed: a comma list of fp32, bf16, fp16" in \
        capsys.readouterr().err
