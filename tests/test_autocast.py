"""Autocast: under ``torch.autocast("cpu", dtype=...)`` the op takes the dtypes eager takes and
gives eager's output dtype, with values (and gradients) within the autocast dtype's tolerance.

Eager's conv2d casts lateral, weight and bias to the autocast dtype (float64 excepted) and the
add promotes with ``top``'s dtype; the op rounds the conv inputs the same way but does not round
the conv result before the add, so the two differ by the autocast dtype's rounding."""

from __future__ import annotations

import pytest
import torch
from _differential import assert_matches, eager, eager_gather, forward_backward, gradient_scales, op
from conftest import fused_backends, make_inputs

# n, c_in, c_out, out_hw, top_hw: non-2x sizes, C_out over one 32-row block.
SHAPE = (2, 17, 40, (19, 30), (10, 15))
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def leaves(lateral_dtype, weight_dtype, top_dtype, channels_last=False):
    lateral, weight, bias, top = make_inputs(*SHAPE, channels_last=channels_last)
    return (
        lateral.to(lateral_dtype).requires_grad_(),
        weight.to(weight_dtype).requires_grad_(),
        bias.to(weight_dtype).requires_grad_(),
        top.to(top_dtype).requires_grad_(),
    )


def run_both(backend, low, dtypes, channels_last=False, **kwargs):
    """(eager's, the op's) (output, gradients) under torch.autocast("cpu", dtype=low)."""
    lateral_dtype, _, top_dtype = dtypes
    out_dtype = torch.promote_types(low if lateral_dtype != torch.float64 else lateral_dtype,
                                    top_dtype)
    n, _, c_out, out_hw, _ = SHAPE
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(n, c_out, *out_hw, generator=g).to(out_dtype)
    results = []
    for fn in (eager_gather, op(backend)):
        with torch.autocast("cpu", dtype=low):
            results.append(forward_backward(fn, leaves(*dtypes, channels_last), grad_out,
                                            **kwargs))
    return results


@pytest.mark.parametrize("backend", fused_backends("cpu"))
@pytest.mark.parametrize("low", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("conv_dtypes", [(torch.float32, torch.float32),
                                         (torch.bfloat16, torch.float32),
                                         (torch.float32, torch.float16)],
                         ids=["fp32-fp32", "bf16-fp32", "fp32-fp16"])
@pytest.mark.parametrize("top_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_autocast_matches_eager(backend, low, conv_dtypes, top_dtype, channels_last):
    """lateral and weight (and bias) in any dtype autocast casts, top in float32 or the
    autocast dtype; forward and backward inside the autocast region."""
    top = torch.float32 if top_dtype == "float32" else low
    (expected, expected_grads), (out, grads) = run_both(
        backend, low, (*conv_dtypes, top), channels_last, mode="nearest-exact")
    with torch.autocast("cpu", dtype=low):
        plain_eager = eager(*leaves(*conv_dtypes, top, channels_last), mode="nearest-exact")
    assert expected.dtype == plain_eager.dtype == torch.promote_types(low, top)
    assert_matches(out, expected, dtype=low, msg=f"{backend} forward")
    scales = gradient_scales(SHAPE[2], SHAPE[0], SHAPE[3], SHAPE[4])
    assert grads.keys() == expected_grads.keys() == {"lateral", "weight", "bias", "top"}
    for name, grad in grads.items():
        # Gradients come back in each leaf's own dtype, like eager's.
        assert_matches(grad, expected_grads[name], dtype=low, scale=scales[name],
                       msg=f"{backend} grad_{name}")


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_autocast_with_scale_factor(backend):
    (expected, expected_grads), (out, grads) = run_both(
        backend, torch.bfloat16, (torch.float32, torch.float32, torch.float32),
        scale_factor=(1.9, 2.0))
    assert_matches(out, expected, dtype=torch.bfloat16, msg="forward")
    scales = gradient_scales(SHAPE[2], SHAPE[0], SHAPE[3], SHAPE[4])
    for name, grad in grads.items():
        assert_matches(grad, expected_grads[name], dtype=torch.bfloat16, scale=scales[name],
                       msg=f"grad_{name}")


@pytest.mark.parametrize("backend", fused_backends("cpu"))
@pytest.mark.parametrize("top_dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_autocast_leaves_float64_alone(backend, top_dtype):
    inputs = make_inputs(*SHAPE, dtype=torch.float64)
    inputs = (*inputs[:3], inputs[3].to(top_dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager(*inputs)
        out = op(backend)(*inputs)
    assert expected.dtype == torch.float64
    assert_matches(out, expected, msg=f"{backend} float64 under autocast")


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_autocast_rejects_what_eager_rejects(name):
    """float64 next to a dtype autocast casts: eager's conv2d gets two dtypes and raises."""
    lateral, weight, bias, top = make_inputs(*SHAPE)
    changed = {"weight": weight, "bias": bias, name: dict(weight=weight, bias=bias)[name].double()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            eager(lateral, changed["weight"], changed["bias"], top)
        with pytest.raises(TypeError, match=rf"^{name}: expected a dtype that torch\.bfloat16 "
                                            r"autocast casts to torch\.bfloat16 like lateral's "
                                            r"torch\.float32, got torch\.float64$"):
            op("auto")(lateral, changed["weight"], changed["bias"], top)


def test_autocast_disabled_inside_is_plain():
    inputs = make_inputs(*SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        out = op("auto")(*inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager(*inputs), atol=1e-4, rtol=1e-4)
