"""The command-line tools: `bench` (JSON, plot, markdown), `check` (the matrix, and that it
fails on a wrong backend), and the pieces they are built from."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fpn_kernels import backends, indexing, upsample_add_conv1x1_reference
from fpn_kernels._eager_backend import backward as eager_backward
from fpn_kernels.cli import bench, cases, check, machine, report, roofline
from fpn_kernels.cli.timing import Timing, TimingPolicy, time_round_robin

# --------------------------------------------------------------------------- bench


@pytest.fixture
def small_peaks(monkeypatch):
    # The real peak measurement takes seconds (a 2048^2 mm, a 256 MiB copy); the test only
    # needs the plumbing.
    monkeypatch.setattr(machine, "PEAK_SIZES", {"cpu": (256, 8)})


def test_bench_writes_json_plot_and_markdown(tmp_path, small_peaks, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench.main(["--shape", "1,8,4,6,10,3,5", "--shape", "2,5,3,7,9,4,5",
                     "--min-repeats", "3", "--budget", "0.05",
                     "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    assert out_png.stat().st_size > 10_000  # a real figure, not an empty file
    result = json.loads(out_json.read_text())
    assert {"cpu_model", "cpu_cores", "torch", "triton", "torch_threads"} <= set(result["machine"])
    assert result["peaks"]["gemm_gflops"]["float32"] > 0 and result["peaks"]["stream_gbps"] > 0
    assert len(result["peaks"]["measurements"]) == 2  # at the start and at the end
    assert result["config"]["levels"][0] == {"name": "8x6x10", "n": 1, "c_in": 8, "c_out": 4,
                                             "out_hw": [6, 10], "top_hw": [3, 5]}
    impls = [cases.EAGER, cases.COMPILE, *cases.backend_impls("cpu", torch.float32)]
    rows = result["rows"]
    assert [(r["level"], r["impl"]) for r in rows] == [
        (level, impl) for level in ("8x6x10", "5x7x9", "total") for impl in impls]
    for row in rows:
        assert row["median_ms"] > 0 and row["gflops"] > 0 and row["gbps"] > 0
        assert row["pct_roofline"] > 0 and row["pct_gemm_peak"] > 0
        assert row["max_abs_err"] < 1e-4, row
        assert row["bytes_model"] == ("fused" if row["impl"] == "cpu" else "eager")
        if row["level"] != report.TOTAL:
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["repeats"] >= 3
    eager = {r["level"]: r for r in rows if r["impl"] == cases.EAGER}
    for row in rows:
        assert row["speedup_vs_eager"] == pytest.approx(
            eager[row["level"]]["median_ms"] / row["median_ms"])
    total = eager[report.TOTAL]
    assert total["median_ms"] == pytest.approx(eager["8x6x10"]["median_ms"]
                                               + eager["5x7x9"]["median_ms"])
    printed = capsys.readouterr().out
    assert "vs compile" in printed and "5x7x9" in printed

    assert report.main([str(out_json)]) == 0
    markdown = capsys.readouterr().out
    assert "| level | impl | median ms |" in markdown
    assert markdown.count("| total |") == len(impls)


def test_bench_backward_channels_last_float64(tmp_path, small_peaks):
    out_json = tmp_path / "bench.json"
    rc = bench.main(["--shape", "1,6,4,5,8,3,4", "--mode", "fwd+bwd", "--layout",
                     "channels_last", "--dtype", "float64", "--no-compile", "--min-repeats", "3",
                     "--budget", "0.02", "--json", str(out_json)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert {r["impl"] for r in result["rows"]} == {
        cases.EAGER, *cases.backend_impls("cpu", torch.float64)}
    for row in result["rows"]:
        assert (row["dtype"], row["layout"], row["direction"]) == (
            "float64", "channels_last", "fwd+bwd")
        assert row["max_abs_err"] < 1e-10  # output and all four gradients
        assert row["speedup_vs_compile"] is None


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "float8"])
    with pytest.raises(SystemExit):
        bench.main(["--shape", "1,2,3"])
    assert "float8" in capsys.readouterr().err


def test_layout_and_mode_lists_take_both_as_their_help_says(capsys):
    """`--layout both` / `--mode both` (the help's words) once failed as an unknown name."""
    args = bench.build_parser().parse_args(["--layout", "both", "--mode", "both"])
    assert args.layout == ["nchw", "channels_last"]
    assert args.mode == ["fwd", "fwd+bwd"]
    assert bench.build_parser().parse_args(["--layout", "channels_last,nchw"]).layout == [
        "channels_last", "nchw"]
    assert cases.parse_names("nchw, both", cases.LAYOUTS) == ["nchw", "channels_last"]
    with pytest.raises(ValueError, match="or both; got 'nhwc'"):
        cases.parse_names("nhwc", cases.LAYOUTS)
    with pytest.raises(ValueError, match="got ','"):
        cases.parse_names(",", cases.LAYOUTS)
    with pytest.raises(SystemExit, match="--layout: expected a comma list of nchw, channels_last"):
        check.main(["--layout", "nhwc"])
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "both"])  # four dtypes: "both" means nothing there
    assert "got 'both'" in capsys.readouterr().err


# --------------------------------------------------------------------------- pieces


def test_presets_match_the_resnet50_fpn_shapes():
    p4, p3, p2 = cases.preset_levels("r50-800x1216-n2")
    assert (p4.c_in, p4.out_hw, p4.top_hw) == (1024, (50, 76), (25, 38))
    assert (p3.c_in, p3.out_hw, p3.top_hw) == (512, (100, 152), (50, 76))
    assert (p2.c_in, p2.out_hw, p2.top_hw) == (256, (200, 304), (100, 152))
    assert {lv.n for lv in (p4, p3, p2)} == {2} and {lv.c_out for lv in (p4, p3, p2)} == {256}
    assert [lv.out_hw for lv in cases.preset_levels("r50-512x512")] == [(32, 32), (64, 64),
                                                                        (128, 128)]
    seed = cases.preset_levels("seed")
    assert [(lv.c_in, lv.c_out, lv.out_hw, lv.top_hw) for lv in seed] == [
        (128, 32, (64, 64), (32, 32)), (64, 32, (128, 128), (64, 64))]


def test_bytes_model_follows_design():
    level = cases.Level("P2", 2, 256, 256, (200, 304), (100, 152))
    lateral, weight = 2 * 256 * 200 * 304, 256 * 256
    out, top = 2 * 256 * 200 * 304, 2 * 256 * 100 * 152
    assert roofline.bytes_moved(level, 4, True, "fwd") == 4 * (lateral + weight + top + out)
    assert roofline.bytes_moved(level, 4, False, "fwd") == 4 * (
        lateral + weight + out + top + out + 3 * out)
    assert roofline.gemm_flops(level, "fwd") == 2 * 2 * 256 * 256 * 200 * 304
    assert roofline.gemm_flops(level, "fwd+bwd") == 3 * roofline.gemm_flops(level, "fwd")
    # fused backward reads/writes strictly less than eager's
    assert roofline.bytes_moved(level, 2, True, "fwd+bwd") < roofline.bytes_moved(
        level, 2, False, "fwd+bwd")
    assert roofline.roofline_ms(2e9, 1e9, 100.0, 10.0) == pytest.approx(100.0)  # memory-bound
    assert roofline.roofline_ms(2e10, 1e6, 100.0, 10.0) == pytest.approx(200.0)  # compute


def test_timing_quantiles_and_noise_flag():
    steady = Timing.from_samples([10.0, 10.1, 9.9, 10.0, 10.05])
    assert steady.median_ms == pytest.approx(10.0) and not steady.noisy
    noisy = Timing.from_samples([10.0, 14.0, 7.0, 10.0, 12.0])
    assert noisy.p20_ms < noisy.median_ms < noisy.p80_ms and noisy.noisy


def test_round_robin_times_every_function_at_least_min_repeats():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def fn():
            calls[name] += 1
        return fn

    timings = time_round_robin({n: counter(n) for n in calls},
                               TimingPolicy(min_repeats=4, max_repeats=6, budget_s=0.0,
                                            min_sample_s=0.0))
    assert {n: t.repeats for n, t in timings.items()} == {"a": 4, "b": 4}
    assert calls == {"a": 5, "b": 5}  # one untimed warm-up each


# --------------------------------------------------------------------------- check


def test_check_quick_passes():
    assert check.main(["--quick"]) == 0


def _register_backend(monkeypatch, name, forward, backward):
    module = types.ModuleType(f"fpn_kernels_test_{name}")
    module.forward, module.backward = forward, backward
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends.BACKENDS, name, backends.Backend(
        name, module.__name__, devices=("cpu",), dtypes=(torch.float32,)))


# Backend functions take (lateral, weight, bias, top, mode, scale_factor, ...layout arguments);
# the broken ones below ignore the rest.
def _forward_with_cuda_index_rule(lateral, weight, bias, top, mode, scale_factor, *_):
    """A plausible bug: the CUDA kernel's index formula on CPU tensors, i.e. without ATen's CPU
    short-cuts. Right for every size except an odd scale factor with out == 2 * in."""
    (h, w), (out_h, out_w) = top.shape[2:], lateral.shape[2:]
    sh, sw = scale_factor if scale_factor is not None else (None, None)
    rows = indexing.index_table_tensor("source", h, out_h, sh, mode, "cuda", top.device,
                                       torch.int64)
    cols = indexing.index_table_tensor("source", w, out_w, sw, mode, "cuda", top.device,
                                       torch.int64)
    conv = F.conv2d(lateral, weight[:, :, None, None], bias)
    return conv + top[:, :, rows][:, :, :, cols]


def test_check_fails_on_a_wrong_forward_index(monkeypatch, capsys):
    _register_backend(monkeypatch, "broken", _forward_with_cuda_index_rule, eager_backward)
    assert check.main(["--quick", "--backends", "broken", "--dtype", "float32"]) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    # Caught exactly where the rule differs: the 2.05 scale factor, in both layouts.
    assert len(failures) == 2, failures
    assert all("scale-2.05 forward" in line and "max abs err" in line for line in failures)


def test_check_fails_on_a_wrong_gradient(monkeypatch, capsys):
    def forward(lateral, weight, bias, top, mode, scale_factor, *_):
        return upsample_add_conv1x1_reference(lateral, weight, bias, top, mode, scale_factor)

    def backward(*args):
        grads = list(eager_backward(*args))
        grads[3] = grads[3] * 1.001  # grad_top off by 0.1%
        return tuple(grads)

    _register_backend(monkeypatch, "broken", forward, backward)
    assert check.main(["--quick", "--backends", "broken", "--dtype", "float32",
                       "--layout", "nchw"]) == 1
    out = capsys.readouterr().out
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failures) == len(check.QUICK_CASES)
    assert all(" grad_top: " in line for line in failures)
    assert f"{len(check.QUICK_CASES)} failures" in out


def test_check_compare_reports_the_worst_element():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2] = 1e-3
    fp32 = check.tolerance(torch.float32, "cpu")
    problem = check.compare(actual, expected, fp32)
    assert "1 of 6 elements" in problem and "(1, 2)" in problem
    assert check.compare(actual, expected, check.tolerance(torch.float16, "cpu")) is None
    assert check.compare(actual, expected, fp32, scale=20.0) is None
    assert "dtype" in check.compare(actual.double(), expected, fp32)
    actual[0, 0] = float("nan")
    assert "2 of 6" in check.compare(actual, expected, fp32)


def test_check_tolerance_follows_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert check.tolerance(torch.float32, "cuda") == check.TOLERANCES["tf32"]
    assert check.tolerance(torch.float32, "cpu") == check.TOLERANCES["float32"]
    with check.fp32_math("float32", "cuda"):
        assert not torch.backends.cudnn.allow_tf32
        assert check.tolerance(torch.float32, "cuda") == check.TOLERANCES["float32"]
    assert torch.backends.cudnn.allow_tf32


def test_bench_adds_the_end_to_end_neck_rows(tmp_path, small_peaks, monkeypatch):
    pytest.importorskip("fpn_kernels.cli.neck_bench")
    # A small image keeps the whole neck (3x3 convs included) at milliseconds.
    monkeypatch.setitem(cases.PRESETS, "r50-64x96", cases.resnet50_preset(1, (64, 96)))
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.main(["--preset", "r50-64x96", "--no-compile", "--min-repeats", "3",
                       "--budget", "0.02", "--json", str(out_json), "--plot", str(out_png)]) == 0
    assert out_png.stat().st_size > 10_000
    result = json.loads(out_json.read_text())
    assert "| neck | fused |" in report.markdown(result)
    rows = result["rows"]
    levels = dict.fromkeys(r["level"] for r in rows if r["section"] == "level")
    assert list(levels) == ["P4", "P3", "P2", report.TOTAL]
    neck = {r["impl"]: r for r in rows if r["section"] == "neck"}
    assert set(neck) == {bench.NECK_BASELINE, "fused"}
    assert neck[bench.NECK_BASELINE]["speedup_vs_eager"] == 1.0
    assert neck["fused"]["max_abs_err"] < 1e-3  # five output levels after 3x3 convs, fp32
    assert neck["fused"]["median_ms"] > 0 and neck["fused"]["gflops"] is None


def test_cpu_reduced_precision_peak_is_at_least_float32s(monkeypatch):
    """Without bf16 instructions torch.mm emulates bf16 at ~0.3 GFLOP/s (the EPYC here): a peak
    that low would rate every bf16 kernel at thousands of percent."""
    measured = {torch.float32: 150.0, torch.bfloat16: 0.3, torch.float16: 200.0}
    monkeypatch.setattr(machine, "_gemm_gflops", lambda dtype, device, size: measured[dtype])
    peaks = machine.measure_peaks("cpu", [torch.bfloat16, torch.float16])
    assert peaks.gemm_gflops == {"bfloat16": 150.0, "float16": 200.0}


def test_summary_shows_each_case_and_what_auto_picks(tmp_path, small_peaks, monkeypatch, capsys):
    if "cpu" not in backends.available_backends():
        pytest.skip("the cpu backend (compiled extension) is not built")
    from fpn_kernels import _cpu_backend

    # A rule that leaves the C_in = 8 level to eager, whatever this machine's ISA.
    monkeypatch.setattr(_cpu_backend, "auto_declines",
                        lambda dtype, channels_last, c_in: "test rule" if c_in == 8 else None)
    out_json = tmp_path / "bench.json"
    assert bench.main(["--shape", "1,8,4,6,10,3,5", "--shape", "1,5,3,7,9,4,5",
                       "--min-repeats", "3", "--budget", "0.05", "--no-compile",
                       "--layout", "both", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    picks = {(r["layout"], r["level"]): r["auto_backend"] for r in result["rows"]
             if r["impl"] == "cpu"}
    assert picks == {(layout, level): backend for layout in cases.LAYOUTS
                     for level, backend in (("8x6x10", "eager"), ("5x7x9", "cpu"),
                                            (report.TOTAL, None))}
    capsys.readouterr()
    assert report.main(["--summary", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| case | 8x6x10 | 5x7x9 | total | auto picks | auto total |" in text
    by = {(r["layout"], r["level"], r["impl"]): r["median_ms"] for r in result["rows"]}
    for layout in cases.LAYOUTS:
        line = next(line for line in text.splitlines()
                    if line.startswith(f"| float32, {layout}, fwd |"))
        auto_ms = by[(layout, "8x6x10", cases.OP_EAGER)] + by[(layout, "5x7x9", "cpu")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == "eager, cpu"
        assert cells[5] == f"{by[(layout, report.TOTAL, cases.EAGER)] / auto_ms:.2f}x"
        eager_ms, cpu_ms = by[(layout, "8x6x10", cases.EAGER)], by[(layout, "8x6x10", "cpu")]
        assert cells[1].startswith(f"{eager_ms / cpu_ms:.2f}x (")
        # at peak: eager's total (no compile here) over the levels' FLOPs at the GEMM peak.
        flops = sum(r["flops"] for r in result["rows"] if r["layout"] == layout
                    and r["impl"] == "cpu" and r["level"] != report.TOTAL)
        peak_ms = flops / (result["peaks"]["gemm_gflops"]["float32"] * 1e9) * 1e3
        at_peak = by[(layout, report.TOTAL, cases.EAGER)] / peak_ms
        assert cells[3].endswith(f"; at peak {at_peak:.2f}x")
        assert "at peak" not in cells[1] + cells[2]


def test_gemm_floor_times_eagers_conv_alone(tmp_path, small_peaks, capsys):
    """--gemm-floor adds conv-only rows: eager's conv alone, with GFLOP/s but no error or
    bytes model (it computes something else), and the summary's bound eager / conv-only."""
    level = cases.parse_shape("1,8,4,6,10,3,5")
    lateral, weight, bias, top = cases.make_inputs(level, torch.float32, False, "cpu")
    floor = cases.make_impl(cases.CONV_ONLY, "cpu")
    torch.testing.assert_close(floor(lateral, weight, bias, top),
                               F.conv2d(lateral, weight, bias),
                               rtol=0, atol=0)
    out_json = tmp_path / "bench.json"
    assert bench.main(["--shape", "1,8,4,6,10,3,5", "--shape", "1,5,3,7,9,4,5",
                       "--min-repeats", "3", "--budget", "0.05", "--no-compile",
                       "--mode", "both", "--gemm-floor", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    rows = [r for r in result["rows"] if r["impl"] == cases.CONV_ONLY]
    assert {(r["direction"], r["level"]) for r in rows} == {
        (d, lv) for d in cases.DIRECTIONS for lv in ("8x6x10", "5x7x9", report.TOTAL)}
    for r in rows:
        assert r["max_abs_err"] is None and r["bytes"] is None and r["backend"] is None
        assert r["gflops"] > 0 and r["speedup_vs_eager"] > 0
    capsys.readouterr()
    assert report.main(["--summary", str(out_json)]) == 0
    text = capsys.readouterr().out
    by = {(r["direction"], r["level"], r["impl"]): r["median_ms"] for r in result["rows"]}
    line = next(line for line in text.splitlines() if line.startswith("| float32, nchw, fwd+bwd |"))
    bound = by[("fwd+bwd", "8x6x10", cases.EAGER)] / by[("fwd+bwd", "8x6x10", cases.CONV_ONLY)]
    assert f"; bound {bound:.2f}x" in line.split("|")[2]
    assert "- bound (bench --gemm-floor)" in text
    assert report.main([str(out_json)]) == 0
    assert "conv-only (--gemm-floor)" in capsys.readouterr().out
