"""bf16 and fp16: our layer's errors against the float64 truth are no worse than stock PEFT's own BOFT run in the
same precision, for values and gradients of x, boft_R and boft_s, with a bias, at s in {1, 0.05, 0}, under the three
ways users run in low precision (boft_plugin/testing/low_precision.py; table in docs/numerics.md)."""

from __future__ import annotations

import pytest

from boft_plugin.testing.low_precision import TEST_CASES, run_case, worse_than_stock

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("mode,dtype_name,factors,s,bias_scale", TEST_CASES)
def test_no_worse_than_stock_peft_in_the_same_precision(mode, dtype_name, factors, s, bias_scale):
    row = run_case(mode, dtype_name, factors, s, bias_scale)
    assert worse_than_stock(row) == []
