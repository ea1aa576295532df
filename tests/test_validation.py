"""Argument checks at the Python boundary: every bad argument raises before any kernel runs, with
an error that names the argument, what was expected and what came; empty sizes behave like eager
(an empty result where eager gives one, a ValueError where eager raises)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _differential import assert_matches, eager, forward_backward, op
from conftest import fused_backends, make_inputs

from fpn_kernels import BackendUnavailableError, ops, upsample_add_conv1x1

# lateral (2, 5, 10, 19), weight (7, 5, 1, 1), bias (7,), top (2, 7, 5, 10).
SHAPES = dict(n=2, c_in=5, c_out=7, out_hw=(10, 19), top_hw=(5, 10))


@pytest.fixture
def inputs():
    return make_inputs(**SHAPES)


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if the custom op (and so any backend kernel) is reached."""
    def reached(*args, **kwargs):
        raise AssertionError("the op ran a kernel on arguments it should have rejected")

    monkeypatch.setattr(ops, "_upsample_add_conv1x1", reached)


def call(lateral, weight, bias, top, **kwargs):
    return upsample_add_conv1x1(lateral, weight, bias, top, **kwargs)


def replaced(inputs, **changes):
    """The four inputs with some replaced by name (lateral, weight, bias, top)."""
    named = dict(zip(("lateral", "weight", "bias", "top"), inputs, strict=True))
    named.update(changes)
    return named["lateral"], named["weight"], named["bias"], named["top"]


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("name", ["lateral", "weight", "bias", "top"])
@pytest.mark.parametrize("value", [[[1.0]], np.zeros((2, 5, 10, 19), np.float32), 3.0])
def test_non_tensor_input_is_a_type_error(inputs, no_kernel, name, value):
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch\.Tensor, got \w+"):
        call(*replaced(inputs, **{name: value}))


@pytest.mark.parametrize("mode", [None, 1, b"nearest"])
def test_mode_of_wrong_type(inputs, no_kernel, mode):
    with pytest.raises(TypeError, match=rf"^mode: expected a str, got {type(mode).__name__}$"):
        call(*inputs, mode=mode)


@pytest.mark.parametrize("mode", ["bilinear", "Nearest", ""])
def test_unknown_mode(inputs, no_kernel, mode):
    with pytest.raises(
        ValueError, match=rf"^mode: expected one of \['nearest', 'nearest-exact'\], got '{mode}'$"
    ):
        call(*inputs, mode=mode)


@pytest.mark.parametrize("scale_factor", ["2", True, [2.0, "2"], (2.0, None), object(),
                                          torch.tensor(2.0)])
def test_scale_factor_of_wrong_type(inputs, no_kernel, scale_factor):
    with pytest.raises(TypeError,
                       match=r"^scale_factor: expected None, a float or a pair of floats, got "):
        call(*inputs, scale_factor=scale_factor)


@pytest.mark.parametrize(
    "scale_factor, expected",
    [
        ((2.0, 2.0, 2.0), r"expected one value or a pair \(scale_h, scale_w\), got 3 values"),
        ([2.0], r"expected one value or a pair \(scale_h, scale_w\), got 1 values"),
        (0.0, r"expected finite values > 0, got 0\.0$"),
        ((2.0, -2.0), r"expected finite values > 0, got \(2\.0, -2\.0\)$"),
        (float("nan"), r"expected finite values > 0, got nan$"),
        (float("inf"), r"expected finite values > 0, got inf$"),
        # top (5, 10) -> floor((10, 20)) or floor((10, 17)), but lateral is (10, 19).
        (2.0, r"2\.0 upsamples top's \(5, 10\) to \(10, 20\), but lateral's spatial size is "
              r"\(10, 19\)$"),
        ((2.0, 1.7), r"\(2\.0, 1\.7\) upsamples top's \(5, 10\) to \(10, 17\)"),
    ],
)
def test_bad_scale_factor_value(inputs, no_kernel, scale_factor, expected):
    with pytest.raises(ValueError, match=rf"^scale_factor: {expected}"):
        call(*inputs, scale_factor=scale_factor)


@pytest.mark.parametrize("scale_factor", [2, np.float32(2.0), np.float64(2.0), (2, 2.0)])
def test_scale_factor_numbers_like_interpolate(scale_factor):
    """ints and numpy scalars are scale factors, as F.interpolate takes them."""
    lateral, weight, bias, top = make_inputs(**{**SHAPES, "out_hw": (10, 20)})
    expected = eager(lateral, weight, bias, top, scale_factor=2.0)
    torch.testing.assert_close(call(lateral, weight, bias, top, scale_factor=scale_factor),
                               expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, 1, ["cpu"]])
def test_backend_of_wrong_type(inputs, no_kernel, backend):
    with pytest.raises(TypeError, match=rf"^backend: expected a str, got {type(backend).__name__}"):
        call(*inputs, backend=backend)


def test_unknown_backend(inputs, no_kernel):
    with pytest.raises(ValueError, match=r"^backend: expected 'auto' or one of \[.*'eager'.*\], "
                                         r"got 'gpu'$") as info:
        call(*inputs, backend="gpu")
    assert not isinstance(info.value, BackendUnavailableError)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_that_cannot_run_cpu_tensors(inputs, no_kernel, backend):
    """Explicit requests never fall back: the error says which backend and why."""
    if backend in fused_backends("cpu"):
        pytest.skip(f"{backend} runs CPU tensors in this process (TRITON_INTERPRET=1)")
    assert issubclass(BackendUnavailableError, ValueError)
    with pytest.raises(BackendUnavailableError,
                       match=rf"^backend '{backend}' cannot run torch\.float32 tensors on cpu: "):
        call(*inputs, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "cpu", "eager"])
def test_no_backend_for_the_device(backend):
    """Every input on a device no backend runs on ("meta" here)."""
    lateral, weight, bias, top = (t.to("meta") for t in make_inputs(**SHAPES))
    with pytest.raises(BackendUnavailableError, match=r"^backend.*meta"):
        call(lateral, weight, bias, top, backend=backend)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("lateral", (5, 10, 19), r"^lateral: expected a 4-D tensor \(N, C_in, H, W\), got a 3-D "
                                 r"tensor of shape \(5, 10, 19\)$"),
        ("lateral", (1, 2, 5, 10, 19), r"^lateral: expected a 4-D .* got a 5-D tensor"),
        ("top", (7, 5, 10), r"^top: expected a 4-D tensor \(N, C_out, h, w\), got a 3-D tensor "
                            r"of shape \(7, 5, 10\)$"),
        ("weight", (7, 5, 1), r"^weight: expected a \(C_out, C_in, 1, 1\) or \(C_out, C_in\) "
                              r"tensor, got a 3-D tensor of shape \(7, 5, 1\)$"),
        ("weight", (7, 5, 3, 3), r"^weight: expected a \(C_out, C_in, 1, 1\) .* got a 4-D tensor "
                                 r"of shape \(7, 5, 3, 3\)$"),
        ("weight", (35,), r"^weight: expected .* got a 1-D tensor of shape \(35,\)$"),
        ("weight", (7, 4, 1, 1), r"^weight: expected C_in = 5 \(lateral's channels\), got weight "
                                 r"of shape \(7, 4, 1, 1\)$"),
        ("weight", (7, 6), r"^weight: expected C_in = 5 .* got weight of shape \(7, 6\)$"),
        ("top", (2, 6, 5, 10), r"^top: expected C_out = 7 channels \(weight's output channels\), "
                               r"got top of shape \(2, 6, 5, 10\)$"),
        ("top", (3, 7, 5, 10), r"^top: expected batch size 2 \(lateral's\), got 3$"),
        ("bias", (8,), r"^bias: expected shape \(7,\), got \(8,\)$"),
        ("bias", (1, 7), r"^bias: expected shape \(7,\), got \(1, 7\)$"),
        ("bias", (), r"^bias: expected shape \(7,\), got \(\)$"),
    ],
)
def test_bad_shape(inputs, no_kernel, name, shape, expected):
    with pytest.raises(ValueError, match=expected):
        call(*replaced(inputs, **{name: torch.randn(shape)}))


def test_two_d_weight_is_accepted():
    lateral, weight, bias, top = make_inputs(**SHAPES)
    torch.testing.assert_close(call(lateral, weight.reshape(7, 5), bias, top),
                               eager(lateral, weight, bias, top), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("name", ["lateral", "weight", "bias", "top"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64, torch.complex128])
def test_unsupported_dtype(inputs, no_kernel, name, dtype):
    current = dict(zip(("lateral", "weight", "bias", "top"), inputs, strict=True))[name]
    with pytest.raises(TypeError, match=rf"^{name}: expected a floating-point tensor \(float16, "
                                        rf"bfloat16, float32, float64\), got {dtype}$"):
        call(*replaced(inputs, **{name: current.to(dtype)}))


@pytest.mark.parametrize("name", ["weight", "bias", "top"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_mismatch(inputs, no_kernel, name, dtype):
    current = dict(zip(("lateral", "weight", "bias", "top"), inputs, strict=True))[name]
    with pytest.raises(TypeError,
                       match=rf"^{name}: expected dtype torch\.float32 \(lateral's\), "
                             rf"got {dtype}$"):
        call(*replaced(inputs, **{name: current.to(dtype)}))


@pytest.mark.parametrize("name", ["weight", "bias", "top"])
def test_device_mismatch(inputs, no_kernel, name):
    """"meta" stands in for a second device."""
    current = dict(zip(("lateral", "weight", "bias", "top"), inputs, strict=True))[name]
    with pytest.raises(ValueError,
                       match=rf"^{name}: expected a tensor on cpu \(lateral's device\), got meta$"):
        call(*replaced(inputs, **{name: current.to("meta")}))


def test_device_mismatch_names_the_first_other_tensor(inputs, no_kernel):
    lateral, weight, bias, top = inputs
    with pytest.raises(ValueError,
                       match=r"^weight: expected a tensor on meta \(lateral's device\), got cpu$"):
        call(lateral.to("meta"), weight, bias, top)


# --------------------------------------------------------------------------- empty sizes

# (n, c_in, c_out, out_hw, top_hw) -> the argument our ValueError names when eager raises.
EMPTY_CASES = {
    "N=0": ((0, 3, 4, (6, 6), (3, 3)), None),
    "N=0, top larger": ((0, 3, 4, (3, 5), (6, 7)), None),
    "C_in=0": ((2, 0, 4, (6, 6), (3, 3)), "lateral"),
    "C_out=0": ((2, 3, 0, (6, 6), (3, 3)), "weight"),
    "N=0, C_in=0": ((0, 0, 4, (6, 6), (3, 3)), "lateral"),
    "H=0, h=0": ((2, 3, 4, (0, 6), (0, 3)), "lateral"),
    "H=0, h>0": ((2, 3, 4, (0, 6), (3, 3)), "lateral"),
    "W=0, w>0": ((2, 3, 4, (6, 0), (3, 3)), "lateral"),
    "H=W=0, h=w=0": ((2, 3, 4, (0, 0), (0, 0)), "lateral"),
    "N=0, H=0": ((0, 3, 4, (0, 6), (3, 3)), "lateral"),
    "h=0, H>0": ((2, 3, 4, (6, 6), (0, 3)), "top"),
    "w=0, W>0": ((2, 3, 4, (6, 6), (3, 0)), "top"),
    "N=0, h=0, H>0": ((0, 3, 4, (6, 6), (0, 3)), "top"),
}


@pytest.mark.parametrize("backend", ["auto", *fused_backends("cpu")])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_sizes_like_eager(case, mode, channels_last, backend):
    (n, c_in, c_out, out_hw, top_hw), rejected = EMPTY_CASES[case]

    def leaves():
        return make_inputs(n, c_in, c_out, out_hw, top_hw, channels_last=channels_last,
                           requires_grad=True)

    try:
        expected = eager(*leaves(), mode=mode)
    except RuntimeError:
        expected = None
    # The table says where eager raises; keep it honest against this torch.
    assert (expected is None) == (rejected is not None), f"eager's behaviour changed for {case}"
    if rejected is not None:
        with pytest.raises(ValueError, match=rf"^{rejected}: expected [a-zA-Z_, ]+ >= 1"):
            op(backend)(*leaves(), mode=mode)
        return
    grad_out = torch.randn(expected.shape)
    expected, expected_grads = forward_backward(eager, leaves(), grad_out, mode=mode)
    out, grads = forward_backward(op(backend), leaves(), grad_out, mode=mode)
    assert_matches(out, expected, msg=f"{case} forward")
    assert out.stride() == expected.stride(), "empty output's layout differs from eager's"
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_matches(grad, expected_grads[name], msg=f"{case} grad_{name}")
