"""FP8 weights for the text model's linear layers (``model.quantization: fp8``, issue 23).

Each decoder layer's q/k/v/o and gate/up/down projections become an
:class:`Fp8Linear`: the weight in ``float8_e4m3fn`` with one float32 scale per
output row (row-wise, "per channel"), the bias in the model's dtype.  On a
CUDA card with FP8 tensor cores (compute capability 8.9+) the forward
quantizes the activations per row on the fly ("dynamic") and multiplies with
``torch._scaled_mm``; anywhere else it dequantizes the weight and calls
``F.linear`` — the reference path the CPU tests and the GPU check compare
against (torch 2.14 runs ``_scaled_mm`` on a CPU too, but a CPU has no FP8
units to gain from; ``benchmarks/fp8_check.py --force-fast`` uses it there
to test the check itself).

Two ways in:

* a bf16 checkpoint quantized at load (:func:`quantize_text_linears`, the
  dummy bench included), linear by linear onto the device, so the bf16 copy
  of the weights never sits on the GPU whole;
* a pre-quantized compressed-tensors FP8 checkpoint (the layout of
  RedHatAI/Qwen2.5-VL-7B-Instruct-FP8-dynamic: ``weight`` float8_e4m3fn and
  ``weight_scale`` [out, 1] per linear, ``quantization_config`` in
  config.json), loaded into the same module without decompressing
  (:func:`load_compressed_tensors`).

What stays in bf16, as olmOCR's FP8 recipe and RedHat's checkpoint do: the
vision tower (a fifth of the compute of a page, run once per image, and its
patch embedding and 1280-wide MLP are small GEMMs where quantizing the
activations costs about what FP8 saves), the embeddings and ``lm_head`` (the
logits decide every token; an FP8 ``lm_head`` moves greedy choices between
near-tied tokens for 1 GB saved).

Why by hand rather than a library (decided at the start of issue 23):

* torchao's ``Float8DynamicActivationFloat8WeightConfig`` (row-wise) does
  exactly this, but the device has no torchao (it would travel as a wheel
  pinned to torch 2.11's ABI), it swaps weights for tensor subclasses that
  ``fuse_projections``' ``torch.cat`` and the slot engine's compiled layer
  function do not take, and it is slower than bf16 without torch.compile;
* transformers' compressed-tensors path decompresses to bf16 on the first
  forward unless ``use_optimized_inference`` with compressed-tensors >= 0.15
  (transformers 5.18+; the device has 5.17), and ``FbgemmFp8`` needs the
  fbgemm-gpu package.  The kernel all of them end in is ``torch._scaled_mm``
  with row-wise scales; calling it directly is ~40 lines and keeps the weight
  a plain tensor the engine can fuse.

The functional form :func:`fp8_linear` is what the slot engine's fused layer
functions call (``decode_step.linear``) with the stacked FP8 weight and
scales of q/k/v and of gate/up (:func:`concat`: row-wise scales stack with
their rows); ``decode_step.fuse_projections`` stacks them as it does bf16
weights, so FP8 runs the same compiled decode step and packed prefill, the
activations' per-row quantization compiled into the kernels around each GEMM.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from daemon.backends.transformers import fp8_gemv
from daemon.errors import first_line

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
#: The largest finite e4m3fn value: scales map each row's absolute maximum onto it.
FP8_MAX = float(torch.finfo(FP8).max)
#: The projections quantized in each decoder layer (the text model only).
TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def fp8_capable(device: torch.device) -> bool:
    """Whether ``device`` has FP8 tensor cores (CUDA, compute capability 8.9+)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fast_fp8(device: torch.device) -> bool:
    """Whether FP8 linears on ``device`` take the ``_scaled_mm`` path (capable, and it runs).

    Few rows then take ``fp8_gemv``'s kernel where it is configured (``engine.fp8_rows_kernel``).
    """
    return fp8_capable(device) and scaled_mm_works(device)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (e4m3 weight, float32 scale [out, 1]) with ``weight ~= q * scale``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale.float()).to(dtype)


def quantize_activations(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ("per token") dynamic scales: ``rows`` [m, k] -> (e4m3 rows, float32 scales [m, 1])."""
    scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               *, fast: bool, emulate: bool = False) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for an FP8 ``weight`` [out, in] and row scales ``scale`` [out, 1].

    The functional form a fused layer function calls with its own
    (concatenated) weight and scales.  ``fast``: dynamic per-row activation
    scales and ``torch._scaled_mm`` (CUDA, cc 8.9+, bf16 activations).
    Otherwise the dequantized weight through ``F.linear``; ``emulate`` also
    rounds the activations through FP8 as the fast path does, in the input's
    dtype (fp32 for the GPU check's reference: the same arithmetic, exact
    products).
    """
    shape = x.shape
    if not fast or x.dtype != torch.bfloat16:
        if emulate and not takes_rows_kernel(x):
            xq, x_scale = quantize_activations(x.reshape(-1, shape[-1]))
            x = (xq.float() * x_scale).to(x.dtype).reshape(shape)
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    if takes_rows_kernel(x):
        y = fp8_gemv.fp8_rows(x.reshape(-1, shape[-1]), weight, scale, bias)
        return y.reshape(*shape[:-1], y.shape[-1])
    xq, x_scale = quantize_activations(x.reshape(-1, shape[-1]))
    # weight.t() is the column-major [in, out] operand _scaled_mm wants; scales row-wise on both sides.
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.float().t(), out_dtype=x.dtype)
    if bias is not None:
        y = y + bias  # added here: not every torch takes a bias with row-wise scales
    return y.reshape(*shape[:-1], y.shape[-1])


def takes_rows_kernel(x: torch.Tensor) -> bool:
    """Whether the fast path multiplies ``x`` by the FP8 weight without quantizing it (``fp8_gemv``).

    A few rows on CUDA (a decode step with few slots), where Triton runs: there
    reading the weight is the whole cost, and ``_scaled_mm`` plus a separate
    activation quantization is slower than bf16.  The emulating reference asks
    the same question, so it rounds the activations exactly where the fast path does.
    """
    rows = x.numel() // max(1, x.shape[-1])
    return rows <= fp8_gemv.rows() and x.is_cuda and fp8_gemv.enabled()


_probed: dict[torch.device, bool] = {}


def scaled_mm_works(device: torch.device) -> bool:
    """Whether ``_scaled_mm`` with row-wise scales runs on ``device`` (checked once, outside any graph capture).

    The few-rows kernel (``fp8_gemv``) is tried here too, and switched off with a warning if it fails.
    """
    if device not in _probed:
        w, s = quantize_rows(torch.randn(64, 320, device=device))
        try:
            x = torch.randn(fp8_gemv.MAX_ROWS + 8, 320, device=device, dtype=torch.bfloat16)  # past any kernel
            _probed[device] = _close(fp8_linear(x, w, s, None, fast=True),
                                     fp8_linear(x.float(), w, s, None, fast=False, emulate=True))
        except (RuntimeError, TypeError) as exc:
            log.warning("FP8: torch._scaled_mm with row-wise scales does not run here (%s); "
                        "using the dequantizing path", first_line(exc))
            _probed[device] = False
        if _probed[device]:
            _try_rows_kernel(device, w, s)
    return _probed[device]


def _try_rows_kernel(device: torch.device, w: torch.Tensor, s: torch.Tensor) -> None:
    """Each row tile the engine may launch (``fp8_gemv.block_m`` up to ``engine.fp8_rows_max``), tried once
    before any graph capture: a tile that fails or is wrong leaves the rows below it to the kernel (or, the
    smallest failing, none) and the rest to ``_scaled_mm``, with a warning."""
    below = 0
    for tile, m in ((16, 3), (32, 24), (64, 48), (128, 100)):  # a row count inside each tile
        if tile > 16 and fp8_gemv.rows() <= tile // 2:
            return  # no row count the engine may launch falls in this tile
        x = torch.randn(min(m, fp8_gemv.rows()), 320, device=device, dtype=torch.bfloat16)
        if not takes_rows_kernel(x):
            return
        try:
            problem = "" if _close(fp8_linear(x, w, s, None, fast=True),
                                   fp8_linear(x.float(), w, s, None, fast=False, emulate=True)) else "wrong results"
        except Exception as exc:  # a Triton compile error is not a RuntimeError
            problem = first_line(exc)
        if problem:
            if below:
                log.warning("FP8: the few-rows kernel's %d-row tile does not run here (%s); it takes up to %d rows, "
                            "_scaled_mm the rest", tile, problem, below)
                fp8_gemv.limit_rows(below)
            else:
                log.warning("FP8: the few-rows kernel does not run here (%s); _scaled_mm takes every row count",
                            problem)
                fp8_gemv.disable()
            return
        below = tile


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want).norm() / want.norm()) < 0.05)


class Fp8Linear(torch.nn.Module):
    """A linear layer with an FP8 weight and one float32 scale per output row."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(f"expected a 2-d {FP8} weight, got {weight.dtype} {tuple(weight.shape)}")
        if scale.numel() != weight.shape[0]:
            raise ValueError(f"expected {weight.shape[0]} row scales, got {tuple(scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.float().reshape(-1, 1), requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.fast = fast_fp8(weight.device)
        #: reference runs (benchmarks/fp8_check.py): no _scaled_mm, activations rounded through FP8
        self.emulate = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device | None = None) -> "Fp8Linear":
        """Quantize ``linear`` (moved to ``device`` first, one weight at a time)."""
        weight = linear.weight.detach().to(device or linear.weight.device)
        q, scale = quantize_rows(weight)
        bias = linear.bias.detach().to(q.device) if linear.bias is not None else None
        return cls(q, scale, bias)

    def _apply(self, fn: Any, recurse: bool = True) -> "Fp8Linear":
        # model.to(dtype) must not turn the FP8 weight or its float32 scales
        # into bf16: keep their data, and take only the device from ``fn``.
        weight, scale = self.weight.data, self.weight_scale.data
        super()._apply(fn, recurse)
        device = self.weight.device
        self.weight.data, self.weight_scale.data = weight.to(device), scale.to(device)
        self.fast = fast_fp8(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, fast=self.fast and not self.emulate,
                          emulate=self.emulate)

    def dequantized(self) -> torch.nn.Linear:
        """The stock bf16 module computing the same weights (the reference for the GPU check)."""
        dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                 device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dequantize(self.weight, self.weight_scale, dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise"


def concat(linears: list[Fp8Linear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One (weight, scale, bias) for several FP8 linears of the same input, stacked by output rows.

    What a fused projection (q/k/v, gate/up) needs: with one scale per
    output row the rows of different linears stack as they are, and
    ``fp8_linear(x, *concat([q, k, v]), fast=...)`` equals the three outputs
    side by side.  Biases are all present or all absent.
    """
    weight = torch.cat([m.weight for m in linears])
    scale = torch.cat([m.weight_scale for m in linears])
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("some of these linears have a bias and some do not")
    bias = None if biases[0] is None else torch.cat(biases)
    return weight, scale, bias


def text_layers(model: Any) -> list[Any]:
    """The decoder layers of a Qwen2.5-VL model's text model."""
    inner = getattr(model, "model", model)
    text = getattr(inner, "language_model", None)
    if text is None or not hasattr(text, "layers"):
        raise ValueError("not a Qwen2.5-VL model: no model.language_model.layers to quantize")
    return list(text.layers)


def _named_linears(layer: Any) -> Iterable[tuple[Any, str, Any]]:
    for path in TEXT_LINEARS:
        owner_name, attr = path.split(".")
        owner = getattr(layer, owner_name)
        yield owner, attr, getattr(owner, attr)


def quantize_text_linears(model: Any, device: torch.device | str | None = None) -> int:
    """Replace the text model's projections with FP8 ones on ``device``; returns how many.

    One linear at a time: the bf16 weight goes to the device, is quantized
    and dropped, so the device never holds the bf16 text weights whole.
    """
    device = torch.device(device) if device is not None else None
    count = 0
    for layer in text_layers(model):
        for owner, attr, linear in _named_linears(layer):
            if isinstance(linear, Fp8Linear):
                continue
            setattr(owner, attr, Fp8Linear.from_linear(linear, device))
            count += 1
    return count


def dequantize_text_linears(model: Any) -> int:
    """Replace every FP8 projection with the stock linear of its dequantized weight (reference runs)."""
    count = 0
    for layer in text_layers(model):
        for owner, attr, linear in _named_linears(layer):
            if isinstance(linear, Fp8Linear):
                setattr(owner, attr, linear.dequantized())
                count += 1
    return count


def set_emulate(model: Any, emulate: bool) -> int:
    """Switch every FP8 projection to the emulating reference (or back); returns how many."""
    count = 0
    for layer in text_layers(model):
        for _, _, linear in _named_linears(layer):
            if isinstance(linear, Fp8Linear):
                linear.emulate = emulate
                count += 1
    return count


def runs_scaled_mm(model: Any) -> bool:
    """Whether the model's FP8 linears take the fast path (``_scaled_mm``, and ``fp8_gemv`` for few rows)."""
    try:
        return any(isinstance(m, Fp8Linear) and m.fast for layer in text_layers(model) for _, _, m in _named_linears(layer))
    except ValueError:
        return False


def is_fp8(model: Any) -> bool:
    try:
        return any(isinstance(m, Fp8Linear) for layer in text_layers(model) for _, _, m in _named_linears(layer))
    except ValueError:
        return False


# ------------------------------------------------------------ compressed-tensors


def compressed_tensors_fp8(config: dict[str, Any]) -> bool:
    """Whether config.json describes a compressed-tensors checkpoint with FP8 weights per channel."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return False
    for group in (quant.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if weights.get("type") == "float" and weights.get("num_bits") == 8 and weights.get("strategy") == "channel":
            return True
    return False


def _safetensors_names(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the headers (nothing else is read)."""
    names: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        names.update({k: f for k in header if k != "__metadata__"})
    return names


def _checkpoint_prefix(names: Iterable[str], index: int) -> str:
    """Where layer ``index``'s tensors live: ``model.layers.`` (published layout) or ``model.language_model.layers.``."""
    for prefix in ("model.language_model.layers.", "model.layers.", "language_model.model.layers."):
        if any(n.startswith(f"{prefix}{index}.") for n in names):
            return prefix
    raise ValueError(f"no tensors of decoder layer {index} in the checkpoint")


def load_compressed_tensors(model: Any, folder: Path, device: torch.device | str) -> int:
    """Put the FP8 weights and scales of ``folder`` into the text model's projections, as they are.

    ``model`` was built from the config (its text linears hold placeholders);
    the rest of its weights are loaded by transformers, which reads the
    checkpoint's bf16 tensors and skips these.
    """
    from safetensors import safe_open

    device = torch.device(device)
    names = _safetensors_names(folder)
    layers = text_layers(model)
    prefix = _checkpoint_prefix(names, 0)
    ours = {f"{prefix}{i}.{path}.weight_scale" for i in range(len(layers)) for path in TEXT_LINEARS}
    others = sorted(n for n in names if n.endswith(".weight_scale") and n not in ours)
    if others:
        # transformers would load those FP8 weights into bf16 modules without their scales: wrong answers.
        raise ValueError(f"the checkpoint has FP8 weights outside the text model's projections ({others[0]}"
                         f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); vlwatch runs FP8 only "
                         "there (the vision tower and lm_head stay bf16)")
    handles: dict[Path, Any] = {}
    count = 0
    try:
        for i, layer in enumerate(layers):
            prefix = _checkpoint_prefix(names, i)
            for path in TEXT_LINEARS:
                base = f"{prefix}{i}.{path}"
                tensors = {}
                for suffix in ("weight", "weight_scale", "bias"):
                    name = f"{base}.{suffix}"
                    if name not in names:
                        continue
                    f = names[name]
                    if f not in handles:
                        handles[f] = safe_open(str(f), framework="pt", device="cpu")
                    tensors[suffix] = handles[f].get_tensor(name)
                if "weight_scale" not in tensors or tensors.get("weight", torch.empty(0)).dtype != FP8:
                    raise ValueError(f"{base}: expected an FP8 weight and weight_scale in the checkpoint")
                owner_name, attr = path.split(".")
                owner = getattr(layer, owner_name)
                dtype = getattr(owner, attr).weight.dtype
                bias = tensors["bias"].to(device, dtype) if "bias" in tensors else None
                setattr(owner, attr, Fp8Linear(tensors["weight"].to(device), tensors["weight_scale"].to(device), bias))
                count += 1
    finally:
        handles.clear()
    return count
