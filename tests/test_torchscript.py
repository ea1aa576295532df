"""TorchScript: converted detection models script, keep the fused op, and match eager bit for bit.

``torch.jit.script(model)`` used to fail in ``FusedFPN._merge`` (a ModuleList indexed with a
variable), while torchvision's own FPN scripts. The scripted graph calls
``fpn_kernels::upsample_add_conv1x1`` where the block can be fused, and the outputs equal the
eager converted model's, bit for bit.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    retinanet_resnet50_fpn,
)
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

import fpn_kernels
from fpn_kernels.modules import FusedFPN
from tests.test_modules import make_features, randomize_

OP = "fpn_kernels::upsample_add_conv1x1"
SMALL = dict(weights=None, weights_backbone=None, min_size=96, max_size=128,
             box_detections_per_img=8)
MODELS = {
    "fasterrcnn_resnet50_fpn": lambda: fasterrcnn_resnet50_fpn(
        **SMALL, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50),
    "retinanet_resnet50_fpn": lambda: retinanet_resnet50_fpn(**SMALL),
    # v2: BatchNorm2d in the FPN's blocks (folded in eval mode)
    "maskrcnn_resnet50_fpn_v2": lambda: maskrcnn_resnet50_fpn_v2(
        **SMALL, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50),
}


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        yield


def script(module):
    return torch.jit.script(module)


def ops_in_graph(scripted_fpn) -> int:
    """Calls of the op in the scripted merge: one per inner block (the loop is unrolled)."""
    return str(scripted_fpn._merge_scripted.graph).count(OP)


def calls_at_run_time(module, *args) -> int:
    with torch.profiler.profile() as prof, torch.no_grad():
        module(*args)
    return sum(e.count for e in prof.key_averages() if e.key == OP)


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_detection_model_scripts_and_matches_eager_bit_for_bit(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    randomize_(model.backbone.fpn)  # non-zero biases, non-trivial BatchNorm statistics
    fpn_kernels.convert(model)
    assert type(model.backbone.fpn) is FusedFPN
    scripted = script(model)
    # The user's eager model is untouched by scripting.
    assert type(model.backbone.fpn) is FusedFPN
    levels = len(model.backbone.fpn.inner_blocks)  # 4, RetinaNet 3
    assert ops_in_graph(scripted.backbone.fpn) == levels
    images = [torch.rand(3, 90, 117, generator=torch.Generator().manual_seed(1))]
    # one fused merge per level below the top
    assert calls_at_run_time(scripted.backbone, images[0][None]) == levels - 1
    with torch.no_grad():
        want = model(images)
        _, got = scripted(images)
        want_features = model.backbone(images[0][None])
        got_features = scripted.backbone(images[0][None])
    for key in want_features:
        assert torch.equal(got_features[key], want_features[key]), key
    assert len(got) == len(want) == 1
    assert set(got[0]) == set(want[0])
    for key in want[0]:
        assert torch.equal(got[0][key], want[0][key]), key


def fpn_pair(norm_layer):
    """An unconverted torchvision FPN and FusedFPN over the same modules."""
    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([5, 7, 9, 11], 6, LastLevelMaxPool(), norm_layer)
    randomize_(fpn)
    return fpn, FusedFPN.from_torchvision(fpn)


NORMS = {"none": None, "frozen_bn": FrozenBatchNorm2d, "batchnorm": nn.BatchNorm2d}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_scripted_fusedfpn_equals_eager_fusedfpn(norm, channels_last):
    fpn, fused = fpn_pair(NORMS[norm])
    fused.eval()
    scripted = script(fused)
    assert ops_in_graph(scripted) == 4
    features = make_features([(37, 50), (19, 25), (10, 13), (5, 7)], torch.float32,
                             channels_last)
    assert calls_at_run_time(scripted, features) == 3
    with torch.no_grad():
        want, got, unfused = fused(features), scripted(features), fpn.eval()(features)
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
        torch.testing.assert_close(got[key], unfused[key], atol=1e-5, rtol=1e-5)


def test_scripted_batchnorm_in_training_mode_takes_the_eager_expression():
    """The mode is read per call, as in eager: .train() on the scripted module switches the
    merges to batch statistics (and back), bit for bit like eager FusedFPN."""
    fpn, fused = fpn_pair(nn.BatchNorm2d)
    scripted = script(fused)
    features = make_features([(17, 20), (9, 10), (5, 5), (3, 3)], torch.float32, False)
    for training in (True, False, True):
        fused.train(training)
        scripted.train(training)
        with torch.no_grad():
            want, got = fused(features), scripted(features)
        for key in want:
            assert torch.equal(got[key], want[key]), (training, key)
        assert calls_at_run_time(scripted, features) == (0 if training else 3)


def test_scripted_structure_is_checked_at_scripting_time():
    """A block that is not a plain 1x1 conv (here a 3x3 put in by the user after conversion)
    runs eager in the scripted module too, exactly."""
    fpn, fused = fpn_pair(None)
    fused.inner_blocks[1][0] = nn.Conv2d(7, 6, 3, padding=1)
    fpn.eval()
    scripted = script(fused.eval())
    features = make_features([(17, 20), (9, 10), (5, 5), (3, 3)], torch.float32, False)
    assert calls_at_run_time(scripted, features) == 2
    with torch.no_grad():
        want, got = fused(features), scripted(features)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert scripted._script_foldable == [True, False, True, True]


def test_scripted_model_saves_and_loads_in_a_fresh_process(tmp_path):
    fpn, fused = fpn_pair(FrozenBatchNorm2d)
    scripted = script(fused.eval())
    path = tmp_path / "fpn.pt"
    scripted.save(str(path))
    features = make_features([(17, 20), (9, 10), (5, 5), (3, 3)], torch.float32, False)
    torch.save(dict(features), tmp_path / "features.pt")
    with torch.no_grad():
        want = fused(features)
    torch.save(dict(want), tmp_path / "want.pt")
    code = textwrap.dedent(f"""
        from collections import OrderedDict
        import torch
        import fpn_kernels  # registers the op the scripted graph calls
        loaded = torch.jit.load({str(path)!r})
        features = OrderedDict(torch.load({str(tmp_path / "features.pt")!r}))
        want = torch.load({str(tmp_path / "want.pt")!r})
        with torch.no_grad():
            got = loaded(features)
        assert list(got) == list(want), (list(got), list(want))
        assert all(torch.equal(got[k], want[k]) for k in want)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_to_torchvision_after_scripting_is_plain():
    fpn, fused = fpn_pair(None)
    script(fused)
    back = fused.to_torchvision()
    assert type(back) is FeaturePyramidNetwork and not hasattr(back, "_script_foldable")
    assert isinstance(copy.deepcopy(fused), FusedFPN)
