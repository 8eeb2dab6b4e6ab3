"""The FP8 KV cache's decode attention (``kv_fp8``), run by Triton's CPU interpreter (the device runs it compiled)."""

from __future__ import annotations

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 before anything imports triton.
pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

from daemon.backends.transformers import kv_fp8  # noqa: E402

DIM = 128
#: Qwen2.5-VL's attention: 7B 28 query heads over 4 KV heads, 3B 16 over 2, head dim 128 for both.
MODELS = {"7b": (28, 4), "3b": (16, 2)}
#: Columns past ``used``: scaled so that any of them leaking into a row's softmax or sum shows at once.
GARBAGE_SCALE = 1e4


def _cache(slots: int, length: int, n_kv: int, used: torch.Tensor, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized cache whose columns at and past each row's ``used`` (and whole rows past ``used``'s) hold
    huge values, as a slot holds a finished sequence's tokens until overwritten."""
    values, scales = kv_fp8.quantize(torch.randn(slots, length, n_kv, DIM) * spread)
    live = torch.zeros(slots, length, dtype=torch.bool)
    live[:used.shape[0]] = torch.arange(length)[None, :] < used[:, None]
    scales = torch.where(live[:, :, None], scales, GARBAGE_SCALE)
    values = torch.where(live[:, :, None, None], values, torch.full_like(values, kv_fp8.FP8_MAX))
    return values, scales


def _used(rows: int, length: int, seed: int) -> torch.Tensor:
    """Past the first block in row 0 (a lone row over one column would be its value whatever the scores),
    one column in row 1 and the whole cache in row 2 (where there are such rows), the rest anywhere."""
    g = torch.Generator().manual_seed(seed)
    used = torch.randint(1, length + 1, (rows,), generator=g, dtype=torch.int32)
    used[0] = length // 2 + 3
    used[1:2] = 1
    used[2:3] = length
    return used


def _case(model: str, rows: int, length: int, seed: int,
          dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    """q, k, k_scale, v, v_scale, used for ``rows`` rows of a ``model``'s attention over ``length`` columns."""
    heads, n_kv = MODELS[model]
    torch.manual_seed(seed)
    slots = rows + 3  # the engine passes the first n slots of a bigger cache: k[:n]
    used = _used(rows, length, seed)
    k, k_s = _cache(slots, length, n_kv, used, 2.0)
    v, v_s = _cache(slots, length, n_kv, used, 1.0)
    q = (torch.randn(rows, heads, DIM) * 2.0).to(dtype)
    return q, k, k_s, v, v_s, used


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # The interpreter's dots run in float32 (WIDE) and the cache is exact there, so a float32 query gives the
    # reference up to summation order.  A half-precision one adds the output's rounding, which the interpreter
    # does toward zero for bf16 (Triton 3.8 ignores fp_downcast_rounding="rtne" there; the GPU rounds to
    # nearest): up to one bf16 step, 2**-7 of a value, about 2**-8.5 on average.
    assert torch.isfinite(got).all()
    if got.dtype == torch.float32:
        assert float((got - want).norm() / want.norm()) < 1e-5
        return
    assert float((got.float() - want).norm() / want.norm()) < 0.005
    assert float((got.float() - want).abs().max()) <= 0.01 * float(want.abs().max())


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("model", list(MODELS))
def test_the_kernel_is_the_dequantized_attention(model: str, rows: int, splits: int) -> None:
    # 96 columns in blocks of 32: three steps; SPLITS 4 becomes three parts of one step, so row 1 (used 1)
    # leaves two parts empty that the combine must weigh 0 without NaN.
    # A float32 query: the interpreter then computes exactly what the reference does (bf16 in the tests below).
    q, k, k_s, v, v_s, used = _case(model, rows, 96, seed=rows * 10 + splits, dtype=torch.float32)
    scale = DIM ** -0.5
    got = kv_fp8.decode_attention(q, k[:rows], k_s[:rows], v[:rows], v_s[:rows], used, scale,
                                  {"BLOCK_N": 32, "SPLITS": splits})
    want = kv_fp8.reference(q, k, k_s, v, v_s, used, scale)
    assert got.shape == (rows, q.shape[1] * DIM) and got.dtype == torch.float32
    _assert_close(got, want)


def _without_subnormals(cache: torch.Tensor) -> torch.Tensor:
    bits = cache.view(torch.uint8)
    return torch.where((bits & 0x78) == 0, torch.zeros_like(bits), bits).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_and_values_widened_by_moving_bits_give_the_same_attention(dtype: torch.dtype, shift: int) -> None:
    # engine.fp8_widen: bits reads the cache as bytes moved into bf16 2^120 too small, and puts the 2^120 back
    # through the softmax scale (keys) and the value scales: the same numbers, so the same result to the bit.
    # Except in this interpreter where e4m3 subnormals (the small entries of a vector) are involved: they
    # become bf16 subnormals, which its bf16-to-float32 cast loses (0x0010 reads 0; a GPU shifts the bits).
    # So: to the bit without subnormals, and as close to the reference as converting with them.
    q, k, k_s, v, v_s, used = _case("7b", 3, 96, seed=11, dtype=dtype)
    assert bool((((k.view(torch.uint8) & 0x78) == 0) & ((k.view(torch.uint8) & 0x07) != 0)).any())
    want = kv_fp8.reference(q.float(), k, k_s, v, v_s, used, DIM ** -0.5)
    for splits in (1, 3):
        config = {"BLOCK_N": 32, "SPLITS": splits}
        _assert_close(kv_fp8.decode_attention(q, k[:3], k_s[:3], v[:3], v_s[:3], used, DIM ** -0.5,
                                              config | {"SHIFT": shift}), want)
        kn, vn = _without_subnormals(k), _without_subnormals(v)
        converted = kv_fp8.decode_attention(q, kn[:3], k_s[:3], vn[:3], v_s[:3], used, DIM ** -0.5, config)
        moved = kv_fp8.decode_attention(q, kn[:3], k_s[:3], vn[:3], v_s[:3], used, DIM ** -0.5,
                                        config | {"SHIFT": shift})
        assert torch.equal(moved, converted)


def test_a_length_not_a_multiple_of_the_block_and_uneven_parts() -> None:
    # 200 columns of 64: four steps, the last one short; five parts asked: four of one step.
    q, k, k_s, v, v_s, used = _case("7b", 3, 200, seed=5)
    scale = DIM ** -0.5
    want = kv_fp8.reference(q.float(), k, k_s, v, v_s, used, scale)
    for splits in (1, 3, 5):
        _assert_close(kv_fp8.decode_attention(q, k[:3], k_s[:3], v[:3], v_s[:3], used, scale,
                                              {"BLOCK_N": 64, "SPLITS": splits}), want)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_queries(dtype: torch.dtype, splits: int) -> None:
    # bf16 is the engine's dtype; the output is written in it, straight (one part) or by the combine (two).
    q, k, k_s, v, v_s, used = _case("7b", 3, 40, seed=7, dtype=dtype)
    got = kv_fp8.decode_attention(q, k, k_s, v, v_s, used, 0.1, {"BLOCK_N": 16, "SPLITS": splits})
    assert got.dtype == dtype
    _assert_close(got, kv_fp8.reference(q.float(), k, k_s, v, v_s, used, 0.1))


def test_a_query_with_strided_heads() -> None:
    # q as the decode step makes it may be a view of the fused q/k/v projection; the kernel takes its strides.
    q, k, k_s, v, v_s, used = _case("3b", 2, 40, seed=8)
    wide = torch.cat([q, q], dim=1)[:, ::2]  # every other head: stride(1) 2 * DIM
    assert not wide.is_contiguous()
    got = kv_fp8.decode_attention(wide, k[:2], k_s[:2], v[:2], v_s[:2], used, 0.1, {"BLOCK_N": 16})
    _assert_close(got, kv_fp8.reference(wide.float(), k, k_s, v, v_s, used, 0.1))


def test_quantize_round_trips_within_half_an_e4m3_step() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7, 4, DIM) * torch.logspace(-3, 3, 7)[None, :, None, None]  # a wide range of magnitudes
    q, s = kv_fp8.quantize(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    xb = x.to(torch.bfloat16).float()
    back = kv_fp8.dequantize(q, s, torch.float32)
    # 3 mantissa bits: a normal value rounds within 2**-4 of itself; below e4m3's smallest normal (2**-6) the
    # step is 2**-9, half of it 2**-10, in units of the scale.
    bound = 2.0 ** -4 * xb.abs() * (1 + 1e-6) + 2.0 ** -10 * s[..., None]
    assert bool(((back - xb).abs() <= bound).all())
    amax = xb.abs().amax(-1)
    assert bool(((back - xb).abs().amax(-1) <= 2.0 ** -4 * amax).all())
    assert torch.allclose(back.abs().amax(-1), amax, rtol=2.0 ** -4)  # the largest maps onto 448, nearly exact
    assert kv_fp8.dequantize(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_a_zero_vector_quantizes_to_zeros_with_a_finite_scale() -> None:
    x = torch.zeros(2, 3, DIM)
    x[1, 2] = 1.0
    q, s = kv_fp8.quantize(x)
    assert bool((torch.isfinite(s) & (s > 0)).all())
    assert bool((q[0].float() == 0).all()) and bool((q[1, :2].float() == 0).all())
    assert torch.equal(kv_fp8.dequantize(q, s, torch.float32), x)


def test_split_counts_follow_the_shapes_and_the_card() -> None:
    sms = 132  # an H100
    assert kv_fp8.splits_for(1, 4, 2560, 64, sms) == 14  # 16 wanted, 40 blocks: 14 parts of 3
    assert kv_fp8.splits_for(16, 4, 2560, 64, sms) == 8
    assert kv_fp8.splits_for(71, 4, 2560, 64, sms) == 2
    assert kv_fp8.splits_for(128, 4, 2560, 64, sms) == 1  # 512 programs already
    assert kv_fp8.splits_for(128, 2, 1664, 64, sms) == 2  # the 3B, images
    assert kv_fp8.splits_for(1, 4, 40, 64, sms) == 1  # one block: one part
    for n, n_kv, length, block in ((1, 4, 2560, 32), (3, 2, 1664, 128), (16, 4, 100, 16)):
        splits = kv_fp8.splits_for(n, n_kv, length, block, sms)
        blocks = -(-length // block)
        per = -(-blocks // splits)
        assert 1 <= splits <= kv_fp8.MAX_SPLITS and (splits - 1) * per < blocks  # no part wholly past the end


def test_what_the_kernel_cannot_read_is_refused() -> None:
    q, k, k_s, v, v_s, used = _case("3b", 2, 40, seed=9)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        kv_fp8.decode_attention(q, k.to(torch.bfloat16), k_s, v, v_s, used, 0.1)
    with pytest.raises(ValueError, match="used must be int32"):
        kv_fp8.decode_attention(q, k, k_s, v, v_s, used.long(), 0.1)
    with pytest.raises(ValueError, match="rows over"):
        kv_fp8.decode_attention(q, k[:1], k_s[:1], v[:1], v_s[:1], used, 0.1)


def test_the_op_compiles_opaque_with_the_right_shape() -> None:
    """torch.compile traces the custom op through its fake form (what the compiled decode step would do)."""
    q, k, k_s, v, v_s, used = _case("3b", 2, 40, seed=11)
    mix = torch.randn(16 * DIM, 3).to(torch.bfloat16)  # tracing this product needs the op's true output shape

    def step(q: torch.Tensor) -> torch.Tensor:
        return torch.ops.vlwatch.fp8_kv_attention(q, k, k_s, v, v_s, used, 0.1) @ mix

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q)
    want = kv_fp8.reference(q.float(), k, k_s, v, v_s, used, 0.1) @ mix.float()
    assert float((got.float() - want).norm() / want.norm()) < 0.01
    # opcheck's test_schema is left out: it compares the inputs before and after with a product, which torch
    # 2.14 does not implement for float8_e4m3fn on the CPU ("mul_cpu_reduced_float").
    torch.library.opcheck(kv_fp8.fp8_kv_attention, (q, k, k_s, v, v_s, used, 0.1),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
