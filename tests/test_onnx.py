"""ONNX export with both exporters, run in ONNX Runtime and compared with eager PyTorch.

After ``import fpn_kernels`` a plain ``torch.onnx.export`` of a model that calls the fused op
writes standard operators only (``fpn_kernels/export.py`` says how and why). Every test runs the
graph in ONNX Runtime and compares numbers with the unconverted eager model: with real data at
fp32 tolerance, and with ``top`` = pixel index x 1000, so a wrong source pixel shows as an
error of at least 1000.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import fpn_kernels
from fpn_kernels import upsample_add_conv1x1_reference
from fpn_kernels.export import OP, decompose

onnx = pytest.importorskip("onnx", reason="onnx is a test dependency (Makefile)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (Makefile)")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

EXPORTERS = {"dynamo": True, "legacy": False}
FP32 = dict(atol=2e-5, rtol=2e-5)  # ONNX Runtime's Conv against ATen's, unit-scale data
INDEX = dict(atol=1.0, rtol=0.0)  # a wrong source pixel is off by >= 1000


@pytest.fixture(autouse=True)
def quiet_exporters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings, the legacy exporter's deprecation
        yield


class Merge(torch.nn.Module):
    def __init__(self, c_in=5, c_out=6, mode="nearest", scale_factor=None, bias=True,
                 weight_2d=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(c_out, c_in, 1, 1, generator=g) / c_in**0.5
        self.weight = torch.nn.Parameter(w.reshape(c_out, c_in) if weight_2d else w)
        self.bias = torch.nn.Parameter(torch.randn(c_out, generator=g)) if bias else None
        self.mode, self.scale_factor = mode, scale_factor

    def forward(self, lateral, top):
        return fpn_kernels.upsample_add_conv1x1(
            lateral, self.weight, self.bias, top, mode=self.mode, scale_factor=self.scale_factor)

    def eager(self, lateral, top):
        sf = None if self.scale_factor is None else [float(self.scale_factor)] * 2
        return upsample_add_conv1x1_reference(lateral, self.weight, self.bias, top, self.mode, sf)


def export(model, args, exporter, **kwargs) -> bytes:
    f = io.BytesIO()
    if exporter == "dynamo":
        torch.onnx.export(model, args, f, dynamo=True, **kwargs)
    else:
        torch.onnx.export(model, args, f, dynamo=False, **kwargs)
    return f.getvalue()


def session(model_bytes):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def run(sess, *inputs):
    names = [i.name for i in sess.get_inputs()]
    return [torch.from_numpy(o) for o in sess.run(None, dict(zip(names, [
        t.detach().contiguous().numpy() for t in inputs], strict=True)))]


def nodes(model_bytes):
    graph = onnx.load_from_string(model_bytes).graph
    found = list(graph.node)
    for fn in onnx.load_from_string(model_bytes).functions:
        found.extend(fn.node)
    return found


def assert_standard_merge(model_bytes, mode):
    """Only default-domain operators; Conv + (Resize with sizes | Gather) + Add."""
    found = nodes(model_bytes)
    domains = {n.domain for n in found} - {"", "ai.onnx"}
    assert not domains, f"non-standard domains {domains}"
    types = [n.op_type for n in found]
    assert "Conv" in types and "Add" in types, types
    if mode == "nearest":
        resizes = [n for n in found if n.op_type == "Resize"]
        assert len(resizes) == 1, types
        attrs = {a.name: a.s.decode() for a in resizes[0].attribute if a.type == a.STRING}
        assert attrs["mode"] == "nearest" and attrs["nearest_mode"] == "floor"
        assert attrs["coordinate_transformation_mode"] == "asymmetric"
        # inputs: X, roi, scales, sizes: sizes given, scales empty
        inputs = list(resizes[0].input)
        assert len(inputs) == 4 and inputs[3], f"Resize without sizes: {inputs}"
        assert not inputs[2] or _is_empty_constant(model_bytes, inputs[2]), inputs
    else:
        assert "Resize" not in types, types
        assert {"Gather", "GatherND"} & set(types), types


def _is_empty_constant(model_bytes, name):
    graph = onnx.load_from_string(model_bytes).graph
    for init in graph.initializer:
        if init.name == name:
            return 0 in init.dims
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return 0 in onnx.numpy_helper.to_array(n.attribute[0].t).shape
    return False


def index_inputs(n, c_in, c_out, out_hw, top_hw, channels_last, seed=0):
    """lateral random; top[n, c, y, x] = (y * w + x) * 1000 (+ the channel, to see swaps)."""
    g = torch.Generator().manual_seed(seed)
    lateral = torch.randn(n, c_in, *out_hw, generator=g)
    h, w = top_hw
    pixel = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w) * 1000
    top = (pixel + torch.arange(c_out, dtype=torch.float32).reshape(1, c_out, 1, 1)).expand(
        n, c_out, h, w).contiguous()
    if channels_last:
        lateral = lateral.contiguous(memory_format=torch.channels_last)
        top = top.contiguous(memory_format=torch.channels_last)
    return lateral, top


# (out_hw, top_hw, scale_factor): odd ratios from the issue, and the 2x case by scale factor.
CASES = {
    "25x38_from_13x19": ((25, 38), (13, 19), None),
    "13x29_from_7x11": ((13, 29), (7, 11), None),
    "26x38_from_13x19_by_2.0": ((26, 38), (13, 19), 2.0),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_op_exports_as_standard_onnx_exact_in_onnxruntime(exporter, mode, case, bias,
                                                          channels_last):
    out_hw, top_hw, scale_factor = CASES[case]
    model = Merge(mode=mode, scale_factor=scale_factor, bias=bias)
    lateral, top = index_inputs(2, 5, 6, out_hw, top_hw, channels_last)
    model_bytes = export(model, (lateral, top), exporter)
    assert_standard_merge(model_bytes, mode)
    sess = session(model_bytes)
    (got,) = run(sess, lateral, top)
    torch.testing.assert_close(got, model.eager(lateral, top).detach(), **INDEX)
    # Real data: the numbers, not just the indices.
    g = torch.Generator().manual_seed(1)
    lateral, top = torch.randn(lateral.shape, generator=g), torch.randn(top.shape, generator=g)
    (got,) = run(sess, lateral, top)
    torch.testing.assert_close(got, model.eager(lateral, top).detach(), **FP32)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_two_dimensional_weight_exports(exporter):
    model = Merge(weight_2d=True)
    lateral, top = index_inputs(1, 5, 6, (25, 38), (13, 19), False)
    model_bytes = export(model, (lateral, top), exporter)
    assert_standard_merge(model_bytes, "nearest")
    torch.testing.assert_close(run(session(model_bytes), lateral, top)[0],
                               model.eager(lateral, top).detach(), **INDEX)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_non_integral_scale_factor_keeps_eagers_step(exporter):
    """scale_factor 1.5: eager steps by 1 / 1.5, not by in / out; Resize gets scales."""
    model = Merge(scale_factor=1.5)
    lateral, top = index_inputs(1, 5, 6, (15, 22), (10, 15), False)
    model_bytes = export(model, (lateral, top), exporter)
    torch.testing.assert_close(run(session(model_bytes), lateral, top)[0],
                               model.eager(lateral, top).detach(), **INDEX)


# --------------------------------------------------------------------------- dynamic shapes

# lateral (N, C, 2h - 1, 2w - 1) from top (N, C, h, w): three sizes, odd ones included.
DYNAMIC_SIZES = [(1, 7, 11), (3, 13, 19), (2, 50, 76)]


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_dynamic_shapes_export_runs_at_other_sizes(exporter, mode):
    model = Merge(mode=mode)
    lateral, top = index_inputs(2, 5, 6, (19, 29), (10, 15), False)
    if exporter == "dynamo":
        from torch.export import Dim

        n, h, w = Dim("N", min=1, max=64), Dim("H", min=2, max=1024), Dim("W", min=2, max=1024)
        lateral_dims = {0: n, 2: Dim("H_out", min=2, max=2048), 3: Dim("W_out", min=2, max=2048)}
        model_bytes = export(model, (lateral, top), exporter,
                             dynamic_shapes=(lateral_dims, {0: n, 2: h, 3: w}))
    else:
        model_bytes = export(model, (lateral, top), exporter, input_names=["lateral", "top"],
                             dynamic_axes={"lateral": {0: "n", 2: "H", 3: "W"},
                                           "top": {0: "n", 2: "h", 3: "w"}})
    graph = onnx.load_from_string(model_bytes).graph
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert [d.HasField("dim_value") for d in dims] == [False, True, False, False], (
            f"{value.name}: {dims}")  # N, H, W symbolic; the channels fixed
    assert_standard_merge(model_bytes, mode)
    sess = session(model_bytes)
    for n_, h_, w_ in DYNAMIC_SIZES:
        lateral, top = index_inputs(n_, 5, 6, (2 * h_ - 1, 2 * w_ - 1), (h_, w_), False)
        torch.testing.assert_close(run(sess, lateral, top)[0],
                                   model.eager(lateral, top).detach(), **INDEX)


def test_resize_is_exact_on_fpn_ratios_in_onnxruntime():
    """What the "nearest" route relies on: ONNX Runtime's asymmetric/floor Resize picks ATen's
    source pixel when out is in, 2 in - 1 or 2 in (every FPN level), for in = 1..160."""
    model = Merge(c_in=1, c_out=1)
    lateral, top = index_inputs(1, 1, 1, (1, 9), (1, 5), False)
    sess = session(export(model, (lateral, top), "legacy", input_names=["lateral", "top"],
                          dynamic_axes={"lateral": {3: "W"}, "top": {3: "w"}}))
    for width in range(1, 161):
        for out in sorted({width, max(2 * width - 1, 1), 2 * width}):
            lateral, top = index_inputs(1, 1, 1, (1, out), (1, width), False)
            torch.testing.assert_close(run(sess, lateral, top)[0],
                                       model.eager(lateral, top).detach(), **INDEX,
                                       msg=f"{out} from {width}")


def test_half_pixel_resize_is_not_exact_which_is_why_nearest_exact_gathers():
    """The measurement behind exporting "nearest-exact" as a gather: ONNX Runtime's half_pixel /
    round_prefer_ceil Resize reads another source pixel than ATen for 99 pixels from 50. If a
    new ONNX Runtime agrees with ATen here, the Resize route could be reconsidered."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 50])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 1, 1, 99])
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                            coordinate_transformation_mode="half_pixel",
                            nearest_mode="round_prefer_ceil")
    graph = helper.make_graph([node], "resize", [x], [y], initializer=[sizes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    top = torch.arange(50, dtype=torch.float32).reshape(1, 1, 1, 50)
    (got,) = run(session(proto.SerializeToString()), top)
    want = torch.nn.functional.interpolate(top, size=(1, 99), mode="nearest-exact")
    assert not torch.equal(got, want)


# --------------------------------------------------------------------------- what it relies on


def test_the_routes_are_registered_where_the_exporters_look():
    """A torch upgrade that moves either mechanism fails here, by name."""
    from torch.onnx._internal.exporter import _decomp, _registration
    from torch.onnx._internal.torchscript_exporter import registration

    assert torch._decomp.decomposition_table[OP] is decompose
    onnx_ops = set(_decomp.get_onnx_implemented_overloads(
        _registration.ONNXRegistry.from_torchlib()))
    assert OP not in onnx_ops
    assert _decomp.create_onnx_friendly_decomposition_table(onnx_ops)[OP] is decompose
    assert registration.registry.is_registered_op("fpn_kernels::upsample_add_conv1x1",
                                                  fpn_kernels.export.OPSET)


def test_compile_and_plain_export_keep_the_fused_node():
    model = Merge()
    lateral, top = index_inputs(2, 5, 6, (25, 38), (13, 19), False)
    ep = torch.export.export(model, (lateral, top)).run_decompositions()
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert OP in targets and torch.ops.aten.convolution.default not in targets

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(lateral, top)
    torch._dynamo.reset()
    calls = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.fpn_kernels.upsample_add_conv1x1.default in calls, calls


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("scale_factor", [None, [2.0, 2.0], [1.5, 1.5]], ids=str)
def test_decomposition_matches_the_op_and_its_fake_layout(scale_factor, channels_last):
    """The decomposition is the spec (exactly eager's numbers) in the fake kernel's layout."""
    top_hw = (10, 15)
    out_hw = (15, 22) if scale_factor == [1.5, 1.5] else (20, 30)
    lateral, top = index_inputs(2, 5, 6, out_hw, top_hw, channels_last)
    weight, bias = torch.randn(6, 5, 1, 1), torch.randn(6)
    got = decompose(lateral, weight, bias, top, "nearest", scale_factor)
    want = torch.ops.fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, "nearest",
                                                       scale_factor, "eager")
    assert torch.equal(got, want)
    with torch._subclasses.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in (lateral, weight, bias, top)]
        fake = torch.ops.fpn_kernels.upsample_add_conv1x1(*fake_args, "nearest", scale_factor)
    assert got.stride() == fake.stride() == want.stride()


# --------------------------------------------------------------------------- whole models


def converted_backbone(norm_layer=None):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=norm_layer or FrozenBatchNorm2d).eval()
    with torch.no_grad():  # torchvision zeroes FPN biases: make them show
        for name, p in backbone.fpn.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    import copy

    return backbone, fpn_kernels.convert(copy.deepcopy(backbone))


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_converted_detection_backbone_exports_and_matches_the_unconverted_model(exporter):
    """torchvision's R-FPN backbone (resnet18, FrozenBatchNorm2d, LastLevelMaxPool), converted,
    exported, and run in ONNX Runtime at the example size and, dynamically, at an odd one."""
    from fpn_kernels.modules import FusedFPN

    reference, converted = converted_backbone()
    assert isinstance(converted.fpn, FusedFPN)
    x = torch.randn(1, 3, 96, 128)
    if exporter == "dynamo":
        from torch.export import Dim

        shapes = ({0: Dim("N", min=1, max=8), 2: Dim("H", min=32, max=2048),
                   3: Dim("W", min=32, max=2048)},)
        model_bytes = export(converted, (x,), exporter, dynamic_shapes=shapes)
    else:
        model_bytes = export(converted, (x,), exporter, input_names=["images"],
                             dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}})
    found = nodes(model_bytes)
    assert {n.domain for n in found} <= {"", "ai.onnx"}
    assert sum(n.op_type == "Resize" for n in found) == 3  # three fused merges
    sess = session(model_bytes)
    for shape in [(1, 3, 96, 128), (2, 3, 101, 75)]:
        image = torch.randn(shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            want = list(reference(image).values())
        got = run(sess, image)
        assert len(got) == len(want) == 5
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=3e-5, rtol=1e-5)


def test_fusedfpn_channels_last_exports():
    """A channels_last model exports too (ONNX has no layouts; the numbers must agree)."""
    reference, converted = converted_backbone()
    converted = converted.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    sess = session(export(converted, (x,), "dynamo"))
    with torch.no_grad():
        want = list(reference(x).values())
    for g, w in zip(run(sess, x), want, strict=True):
        torch.testing.assert_close(g, w, atol=3e-5, rtol=1e-5)
