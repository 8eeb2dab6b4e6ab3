"""Issue 23: the few-row FP8 kernel (``fp8_gemv``), run by Triton's CPU interpreter (the device runs it compiled)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# conftest.py sets TRITON_INTERPRET=1 before anything imports triton.
pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

from daemon.backends.transformers import e4m3, fp8, fp8_gemv  # noqa: E402


def _reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), fp8.dequantize(q, s, torch.float32), None if bias is None else bias.float())


@pytest.mark.parametrize(("rows", "n", "k", "with_bias"), [
    (1, 96, 320, True),    # one row; columns not a multiple of the tile
    (3, 64, 512, False),
    (16, 130, 257, True),  # the most rows of the 16-row tile; ragged on both sides
    (17, 64, 300, False),  # one past it: the 32-row tile, mostly empty
    (40, 96, 384, True),   # the 64-row tile (engine.fp8_rows_max past 32)
    (64, 70, 256, False),  # the whole 64-row tile
    (100, 48, 200, True),  # the 128-row tile (71 slots: the 7B's pages in fp8 under 22 GiB)
])
def test_rows_kernel_is_the_dequantized_product(rows: int, n: int, k: int, with_bias: bool) -> None:
    torch.manual_seed(rows)
    q, s = fp8.quantize_rows(torch.randn(n, k) * 0.05)
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    got = fp8_gemv.launch(x, q, s, bias, {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 2})
    want = _reference(x, q, s, bias)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    # The activations are not rounded (weight-only FP8): only bf16's output rounding is left.
    assert float((got.float() - want).norm() / want.norm()) < 0.005


@pytest.mark.parametrize(("rows", "n", "k", "split", "with_bias"), [
    (1, 96, 1000, 3, True),    # K not a multiple of the parts or of the step: the last part is short
    (16, 130, 384, 2, False),  # the most rows, ragged columns
    (2, 64, 256, 8, True),     # more parts asked than steps: each part one step, none empty
    (48, 96, 640, 3, True),    # the 64-row tile, split too
])
def test_split_k_adds_its_parts_up_to_the_same_product(rows: int, n: int, k: int, split: int, with_bias: bool) -> None:
    # Split-K for the narrow layers (session 6, call L4: o, q/k/v and down read their weight at 0.9-1.4 TB/s with
    # 112-144 programs for 132 SMs): each output tile's K cut into parts, summed in fp32 by a second kernel.
    torch.manual_seed(k)
    q, s = fp8.quantize_rows(torch.randn(n, k) * 0.05)
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    config = {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 2}
    whole = fp8_gemv.launch(x, q, s, bias, config | {"SPLIT": 1})
    parts = fp8_gemv.launch(x, q, s, bias, config | {"SPLIT": split})
    want = _reference(x, q, s, bias)
    assert parts.shape == (rows, n) and parts.dtype == torch.bfloat16
    assert float((parts.float() - want).norm() / want.norm()) < 0.005
    assert float((parts.float() - whole.float()).abs().max()) <= 0.02 * float(want.abs().max())


@pytest.mark.parametrize(("rows", "n", "k", "split"), [
    (1, 200, 320, 1),   # 7 tiles for 2 programs: each takes three or four, the last ragged
    (5, 96, 1000, 3),   # 3 tiles x 3 parts of K, the last part short
    (40, 64, 256, 1),   # the 64-row tile
])
def test_a_persistent_program_takes_its_tiles_in_turn_to_the_same_product(rows: int, n: int, k: int,
                                                                        split: int) -> None:
    # PERSIST starts a few programs that loop over the (tile, part) pairs; each tile's sums are the ones a
    # program of its own makes, so the product is the same to the bit.
    torch.manual_seed(n)
    q, s = fp8.quantize_rows(torch.randn(n, k) * 0.05)
    x = torch.randn(rows, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    config = {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 2, "SPLIT": split}
    one_each = fp8_gemv.launch(x, q, s, bias, config)
    persistent = fp8_gemv.launch(x, q, s, bias, config | {"PERSIST": 1})
    assert torch.equal(persistent, one_each)
    want = _reference(x, q, s, bias)
    assert float((persistent.float() - want).norm() / want.norm()) < 0.005


@pytest.mark.parametrize(("shift", "split"), [(1, 1), (1, 3), (2, 1)])
def test_a_weight_widened_by_moving_its_bits_gives_the_same_product(shift: int, split: int) -> None:
    # SHIFT reads the e4m3 bytes into bf16 bits 2^120 too small and puts 2^120 back through the row scale:
    # the same numbers as the conversion, subnormals and zeros included (row 0 holds some).
    torch.manual_seed(split)
    w = torch.randn(96, 1000) * 0.05
    w[0, :6] = torch.tensor([0.0, -0.0, 3e-6, -3e-6, 1e-5, -2e-5])  # 448 / 0.05 scale: e4m3 subnormals and zeros
    q, s = fp8.quantize_rows(w)
    bits = q.view(torch.uint8)
    assert bool((((bits & 0x78) == 0) & ((bits & 0x07) != 0)).any())  # there are subnormals to get right
    x = torch.randn(5, 1000).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    config = {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 2, "SPLIT": split}
    converted = fp8_gemv.launch(x, q, s, bias, config)
    assert torch.equal(fp8_gemv.launch(x, q, s, bias, config | {"SHIFT": shift}), converted)


@pytest.mark.parametrize(("rows", "split", "extra"), [
    (1, 3, {}),                          # K in three parts; 7 tiles
    (5, 4, {"SHIFT": 1}),                # with the moved bits
    (2, 2, {"PERSIST": 1}),              # persistent programs finishing tiles they did not start
])
def test_the_last_part_of_a_tile_adds_the_parts_up_to_the_same_product(rows: int, split: int, extra: dict) -> None:
    # FUSE drops split-K's second kernel: the part that counts last sums the parts in order, as that kernel
    # does, so the same bits; and it zeroes its tile's counter, so the next launch sums again (twice here).
    torch.manual_seed(rows + split)
    q, s = fp8.quantize_rows(torch.randn(200, 1000) * 0.05)
    bias = torch.randn(200).to(torch.bfloat16)
    config = {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 2, "SPLIT": split} | extra
    for _ in range(2):
        x = torch.randn(rows, 1000).to(torch.bfloat16)
        assert torch.equal(fp8_gemv.launch(x, q, s, bias, config | {"FUSE": 1}), fp8_gemv.launch(x, q, s, bias, config))


def test_split_for_fills_the_card_only_where_the_tiles_do_not() -> None:
    sms = 132  # an H100
    assert fp8_gemv.split_for(37888, 3584, 32, 512, sms) == 1  # gate/up: 1,184 programs already
    assert fp8_gemv.split_for(3584, 3584, 32, 512, sms) == 4  # o: 112 tiles, 7 steps -> 4 parts of 2 steps
    assert fp8_gemv.split_for(3584, 18944, 32, 512, sms) == 5  # down: 37 steps, 5 parts of 8
    assert fp8_gemv.split_for(2048, 2048, 32, 512, sms) == 4  # the 3B's o: 4 steps, at most 4 parts


def test_rows_go_to_the_smallest_tile_that_holds_them() -> None:
    assert [fp8_gemv.block_m(m) for m in (1, 16, 17, 32, 33, 64, 65, 71, 128)] == [16, 16, 32, 32, 64, 64, 128, 128, 128]


def test_more_rows_than_the_widest_tile_are_refused() -> None:
    q, s = fp8.quantize_rows(torch.randn(32, 64))
    with pytest.raises(ValueError, match="1 to 128 rows, got 129"):
        fp8_gemv.launch(torch.randn(129, 64).to(torch.bfloat16), q, s, None)


def test_rows_up_to_the_configured_count_take_the_kernel() -> None:
    # engine.fp8_rows_max: the wider tiles only where asked; past it _scaled_mm (activations rounded to FP8),
    # and the emulating reference asks the same question, so a check rounds exactly where the engine does.
    class CudaRows(torch.Tensor):  # takes_rows_kernel asks x.is_cuda: the CPU has no CUDA tensor to give it
        @property
        def is_cuda(self) -> bool:  # type: ignore[override]
            return True

    def rows(m: int) -> torch.Tensor:
        return torch.zeros(m, 8).as_subclass(CudaRows)

    try:
        fp8_gemv.configure(True)
        assert fp8_gemv.enabled(), "Triton runs here (the test extra): the switch must turn on"
        assert [fp8.takes_rows_kernel(rows(m)) for m in (1, 16, 17, 64)] == [True, True, False, False]
        fp8_gemv.configure(True, rows=48)
        assert [fp8.takes_rows_kernel(rows(m)) for m in (16, 17, 48, 49)] == [True, True, True, False]
        assert not fp8.takes_rows_kernel(torch.zeros(1, 8))  # a CPU tensor never does
        fp8_gemv.configure(True, rows=128)
        assert [fp8.takes_rows_kernel(rows(m)) for m in (71, 128, 129)] == [True, True, False]
        with pytest.raises(ValueError, match="1 to 128 rows, asked for 129"):
            fp8_gemv.configure(True, rows=129)
    finally:
        fp8_gemv.configure(True)


def test_the_op_compiles_opaque_with_the_right_shape() -> None:
    """torch.compile traces the custom op through its fake form (what the compiled decode step does on CUDA)."""
    q, s = fp8.quantize_rows(torch.randn(48, 128))
    x = torch.randn(2, 128).to(torch.bfloat16)
    mix = torch.randn(48, 3).to(torch.bfloat16)  # tracing this product needs the op's true output shape
    compiled = torch.compile(lambda x: fp8_gemv.fp8_rows(x, q, s, None) @ mix, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    want = _reference(x, q, s, None) @ mix.float()
    assert float((got.float() - want).norm() / want.norm()) < 0.01


def test_the_engine_options_reach_the_kernel(tiny_model: Path) -> None:
    """``engine.fp8_rows_kernel: false``, ``engine.fp8_rows_split``, ``engine.fp8_rows_max`` and
    ``engine.fp8_widen`` (``bench --engine ...`` for an A/B) reach the kernel's switches when an FP8 model
    loads; the defaults turn it on where Triton runs, K split by the card's SMs, up to 16 rows, converted."""
    from daemon.backends.transformers.backend import TransformersBackend
    from daemon.config import EngineOptions, ModelConfig
    from daemon.config_reader import parse_engine_options

    model = ModelConfig(name=str(tiny_model), quantization="fp8")
    try:
        for pairs, expected in (([], (True, 0, 16, "convert")), (["fp8_rows_kernel=false"], (False, 0, 16, "convert")),
                                (["fp8_rows_split=1", "fp8_rows_max=128", "fp8_widen=bits"],
                                 (True, 1, 128, "bits"))):
            backend = TransformersBackend(model, options=parse_engine_options(pairs, base=EngineOptions()))
            backend.load()
            assert (fp8_gemv.enabled(), fp8_gemv.split(), fp8_gemv.rows(), e4m3.widen()) == expected
            backend.unload()
    finally:
        fp8_gemv.configure(True)
        e4m3.configure("convert")


def test_the_split_option_is_checked() -> None:
    from daemon.config_reader import ConfigError, parse_engine_options

    with pytest.raises(ConfigError) as err:
        parse_engine_options(["fp8_rows_split=9", "fp8_rows_max=129", "fp8_widen=fast"])
    assert [str(p) for p in err.value.problems] == ["--engine:1: engine.fp8_rows_split: must be at most 8, got 9",
                                                    "--engine:2: engine.fp8_rows_max: must be at most 128, got 129",
                                                    "--engine:3: engine.fp8_widen: 'fast' is not one of convert, "
                                                    "bits"]


@pytest.mark.parametrize(("rows_max", "failing_tile", "rows_left", "enabled"), [
    (128, 64, 32, True), (128, 16, 16, False), (128, None, 128, True),
    (20, 32, 16, True),  # 17-20 rows take the 32-row tile: it is tried too, though 20 is below its middle
])
def test_a_tile_that_fails_at_load_leaves_the_rows_below_it_to_the_kernel(
        monkeypatch: pytest.MonkeyPatch, rows_max: int, failing_tile: int | None, rows_left: int,
        enabled: bool) -> None:
    # At load each row tile up to engine.fp8_rows_max is tried once (fp8.scaled_mm_works): one that fails to
    # build (a Triton compile error, shared memory) must not take the working tiles below it down, nor reach a
    # decode step.  The CPU stands in for the GPU: the interpreter runs the kernel, and "fast" rows are allowed.
    real_launch = fp8_gemv.launch

    def launch(x: torch.Tensor, *args, **kw):  # type: ignore[no-untyped-def]
        if fp8_gemv.block_m(x.shape[0]) == failing_tile:
            raise RuntimeError("out of resource: shared memory")  # what Triton raises for a tile too large
        return real_launch(x, *args, **kw)

    monkeypatch.setattr(fp8_gemv, "launch", launch)
    monkeypatch.setattr(fp8, "takes_rows_kernel", lambda x: x.shape[0] <= fp8_gemv.rows() and fp8_gemv.enabled())
    # The probe runs once per device and process, and a failed kernel stays off for the process: both put back.
    monkeypatch.setattr(fp8, "_probed", {})
    monkeypatch.setattr(fp8_gemv, "_broken", False)
    try:
        fp8_gemv.configure(True, rows=rows_max)
        assert fp8.scaled_mm_works(torch.device("cpu"))  # torch runs _scaled_mm on the CPU too
        assert (fp8_gemv.enabled(), fp8_gemv.rows() if enabled else rows_left) == (enabled, rows_left)
    finally:
        monkeypatch.undo()
        fp8_gemv.configure(True)


def test_the_layer_probe_runs_on_the_cpu(tmp_path: Path) -> None:
    # benchmarks/fp8_layer_graph.py is what a lent GPU runs first (call R1): a Python error there costs a call.
    # Its --cpu mode runs every way and the sweep's variants on small shapes in the interpreter; the bits of
    # the moved and persistent ways against one program a tile are checked as on the GPU (exit 1 if not).
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fp8_layer_graph.py"
    done = subprocess.run([sys.executable, str(script), "--cpu", "--layers", "1", "--reps", "1", "--sweep",
                           "--sweep-seconds", "5", "--out", str(tmp_path)],
                          env=os.environ | {"TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the same bits as the conversion everywhere" in done.stdout
    assert {"fp8_layer_graph.json", "fp8_layer_sweep.json"} <= {p.name for p in tmp_path.iterdir()}
