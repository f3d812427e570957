"""What the memory-bound NHWC kernels share (pools, BatchNorm; the convolutions use the
strided addressing): the [pixels x channels] tile and its grid, and its addressing, and the
on-the-fly BatchNorm (+ ReLU) a pool can apply to each tap. Also the copy a first
convolution layer reads (``padded_copy_launch``): x as a dense [N, H', W', CP] tensor, its
channels zero-padded to CP and its border to the convolution's padding (x through the
convolution's input prologue where it has one). And that prologue's pieces, which every
convolution kernel shares: ``InputNormalization``, ``input_prologue``, ``prologue_operands``.

Addressing has two paths, one constexpr switch (``DENSE_NHWC``) chosen by the launcher
(``layout_constexprs``):
- dense channels_last (pixel stride C, channel stride 1), the fast path: a tile's elements
  are one int64 offset (its first pixel's, or its first image's) plus int32 offsets inside
  the tile, ``pixel * C + channel``, which the compiler sees contiguous along the channels,
  so loads and stores are 16-byte vectors;
- any other strides (NCHW, slices): int64 offsets through the strides.
With ``EVEN_C`` (C a multiple of the channel block) every channel of a tile is valid, so a
tile's mask is its pixels' alone, uniform along a channel vector.

Offsets that can pass 2^31 are int64: a pooled activation of 64x64x224x224 is fine in int32,
but a batch of 1024 such images is not. The int32 offsets inside a tile stay below 2^31 by
the launcher's check (``layout_constexprs``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import FLOATING, UNUSED, Extent, Launch, TileConfig, dense

# The (mean, scale, shift) fp32 [C] vectors of a BatchNorm a kernel applies on the fly.
Normalization = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class InputNormalization(NamedTuple):
    """A convolution's input prologue: each element x[n, c, h, w] is read as
    ``relu?(x * scale[c] + shift[c])`` (fp32 math, rounded back to x's dtype for the MMA),
    and the positions outside the input (padding) stay 0 after it. ``scale`` and ``shift``
    are fp32 [C] vectors of any stride (a BatchNorm with its statistics folded in)."""
    scale: torch.Tensor
    shift: torch.Tensor
    relu: bool


class PrologueOperands(NamedTuple):
    """What an ``InputNormalization`` adds to a launch: the ``in_scale``/``in_shift``
    vectors (absent: x, never read) and their strides, their extents, and the PROLOGUE and
    IN_RELU constexprs."""
    args: dict
    extents: dict
    constexprs: dict


def prologue_operands(prologue: InputNormalization | None, x: torch.Tensor,
                      channels: int) -> PrologueOperands:
    """The launch operands of ``prologue`` for an input ``x`` of ``channels`` channels."""
    vectors = {"in_scale": None, "in_shift": None} if prologue is None else \
        {"in_scale": prologue.scale, "in_shift": prologue.shift}
    args = {**{f"{name}_ptr": x if t is None else t for name, t in vectors.items()},
            **{f"{name}_s": 0 if t is None else t.stride(0) for name, t in vectors.items()}}
    extents = {f"{name}_ptr": UNUSED if t is None
               else Extent((channels,), (f"{name}_s",), (torch.float32,))
               for name, t in vectors.items()}
    return PrologueOperands(args, extents, {"PROLOGUE": prologue is not None,
                                            "IN_RELU": prologue is not None and prologue.relu})


class GradientPrologue(NamedTuple):
    """A convolution's output-gradient prologue (its dgrad's and wgrad's dy operand): each
    element dy[n, k, p, q] is read as ``dy + scale[k] * y[n, k, p, q] + shift[k]`` (fp32
    math, rounded back to dy's dtype for the MMA; positions outside dy stay 0). This is
    BatchNorm's batch-statistics term of its input gradient, folded into the backward of
    the conv whose output y the BatchNorm normalised: dy arrives holding the term at fixed
    statistics. ``y`` has dy's shape (any strides); ``scale``/``shift`` fp32 [K], any
    stride."""
    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class BatchNormGradEpilogue(NamedTuple):
    """A dgrad epilogue for a conv that read its input through an ``InputNormalization``
    (``normalization``: relu?(x * scale + shift)) of x, a BatchNorm's input: the dgrad's
    result dz (the gradient of the normalised input) becomes du = dz masked where the ReLU
    was off (x * scale + shift <= 0 in fp32, the prologue's own arithmetic; no mask without
    ReLU), ``du * scale`` is stored in dx's place (the gradient of x at fixed statistics),
    and each program writes its fp32 per-channel partial sums of du and of du * (x - mean)
    to its own row of ``sums`` [rows, 2, C] (dense; every row written, zeros where a
    program has no pixel; the caller sums the rows in order). ``x`` is dx's shape (any
    strides), ``mean`` fp32 [C] (any stride)."""
    x: torch.Tensor
    mean: torch.Tensor
    normalization: InputNormalization
    sums: torch.Tensor


@triton.jit
def gradient_prologue(grad, y, ok, scale, shift):
    """``grad + scale * y + shift`` in fp32 where ``ok`` (inside dy), else 0, in grad's
    dtype; ``scale``/``shift`` fp32, broadcast to grad's shape (``GradientPrologue``)."""
    g = grad.to(tl.float32) + scale * y.to(tl.float32) + shift
    return tl.where(ok, g, 0.0).to(grad.dtype)


@triton.jit
def batch_norm_grad_epilogue(dz, x, ok, mean, scale, shift, RELU: tl.constexpr):
    """``BatchNormGradEpilogue`` on an fp32 [BLOCK_M, BLOCK_N] tile ``dz`` with its x tile
    (``ok``: valid elements; ``mean``/``scale``/``shift`` fp32 [1, BLOCK_N]): (du * scale,
    the column sums of du and of du * (x - mean)), masked elements contributing 0. RELU
    zeroes du where the prologue's own arithmetic gives x * scale + shift <= 0 (torch's
    threshold_backward: NaN passes)."""
    xf = x.to(tl.float32)
    du = tl.where(ok, dz, 0.0)
    if RELU:
        du = tl.where(xf * scale + shift <= 0.0, 0.0, du)
    return du * scale, tl.sum(du, axis=0), tl.sum(du * (xf - mean), axis=0)


@triton.jit
def normalize_grad(dz, x, mean, scale, shift, RELU: tl.constexpr):
    """``batch_norm_grad_epilogue``'s results for a kernel that read x through ``normalize``
    (a pool with a BatchNorm fused in): on the fp32 [BLOCK_M, BLOCK_C] tiles dz (0 on the
    tile's masked elements) and x, with the fp32 [BLOCK_C] channel vectors, (du * scale,
    the column sums of du and of du * (x - mean)). RELU zeroes du where ``normalize``'s own
    arithmetic gives (x - mean) * scale + shift <= 0 (torch's threshold_backward: NaN
    passes)."""
    du = dz
    if RELU:
        du = tl.where(normalize(x, mean, scale, shift, False) <= 0.0, 0.0, dz)
    return du * scale[None, :], tl.sum(du, axis=0), tl.sum(du * (x - mean[None, :]), axis=0)


@triton.jit
def input_prologue(value, ok, scale, shift, RELU: tl.constexpr):
    """relu?(value * scale + shift) in fp32 where ``ok`` (the element lies inside the input),
    else 0 (padding stays zero after the transform), in value's dtype; ``scale``/``shift``
    fp32, broadcast to value's shape. ReLU keeps NaN, as torch."""
    z = value.to(tl.float32) * scale + shift
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)
    return tl.where(ok, z, 0.0).to(value.dtype)


@triton.jit
def split_pixel(m, H, W):
    """Flattened pixel index -> (n, h, w) on an [N, H, W] grid."""
    w = m % W
    t = m // W
    return t // H, t % H, w


@triton.jit
def channel_block(C, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channels (int32) and their mask, every channel valid when EVEN_C (C a
    multiple of BLOCK_C): then the compiler drops the mask."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:
        c_ok = tl.full((BLOCK_C,), 1, tl.int1)
    else:
        c_ok = c < C
    return c, c_ok


@triton.jit
def pixel_block(start, M, BLOCK_M: tl.constexpr):
    """Which of the pixels start .. start + BLOCK_M - 1 (``start`` int64) are among the M."""
    return tl.arange(0, BLOCK_M) < M - start


@triton.jit
def tile_pixels(start, H, W, BLOCK_M: tl.constexpr):
    """The pixels start .. start + BLOCK_M - 1 (flattened, ``start`` int64) of an [N, H, W]
    grid as the image n0 of the first (int64) and each one's (n - n0, h, w) in int32: the
    int64 division runs once, on the first."""
    n0, h0, w0 = split_pixel(start, H, W)
    w = w0.to(tl.int32) + tl.arange(0, BLOCK_M)
    t = h0.to(tl.int32) + w // W
    return n0, t // H, t % H, w % W


@triton.jit
def pixel_channel_tile(M, C, H, W, EVEN_C: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """This program's pixels of an [N, H, W] grid of M pixels (the image n0 of its first,
    int64, and each one's (n - n0, h, w), int32: ``tile_pixels``), its channels, and the
    masks of both (``pixel_block``, ``channel_block``)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    n0, n, h, w = tile_pixels(start, H, W, BLOCK_M)
    c, c_ok = channel_block(C, EVEN_C, BLOCK_C)
    return n0, n, h, w, c, pixel_block(start, M, BLOCK_M), c_ok


@triton.jit
def address(n, h, w, c, stride_n, stride_h, stride_w, stride_c):
    """[BLOCK_M, BLOCK_C] element offsets of pixels (n, h, w) and channels c."""
    return (n * stride_n + h * stride_h + w * stride_w)[:, None] + (c * stride_c)[None, :]


@triton.jit
def nhwc_offsets(n0, n, h, w, c, H, W, C, s_n, s_h, s_w, s_c, DENSE_NHWC: tl.constexpr):
    """[pixels, channels] element offsets in an [N, C, H, W] tensor of pixels (n0 + n, h, w)
    (n0 int64, the int32 vectors n, h, w inside the tensor) and channels c: DENSE_NHWC,
    image n0's int64 offset plus the int32 ((n * H + h) * W + w) * C + c, contiguous along c;
    otherwise through the strides (s_n, s_h, s_w, s_c), int64."""
    if DENSE_NHWC:
        offsets = n0 * H * W * C + ((((n * H + h) * W + w) * C)[:, None] + c[None, :])
    else:
        offsets = n0 * s_n + address(n.to(tl.int64), h.to(tl.int64), w.to(tl.int64),
                                     c.to(tl.int64), s_n, s_h, s_w, s_c)
    return offsets


@triton.jit
def block_offsets(start, c, H, W, C, s_n, s_h, s_w, s_c, DENSE_NHWC: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """[BLOCK_M, channels] element offsets of the pixels start .. start + BLOCK_M - 1
    (flattened N*H*W, ``start`` int64) and channels c of an [N, C, H, W] tensor: DENSE_NHWC,
    one multiply-add, start * C plus the int32 pixel * C + c; otherwise ``nhwc_offsets``."""
    if DENSE_NHWC:
        offsets = start * C + (tl.arange(0, BLOCK_M)[:, None] * C + c[None, :])
    else:
        n0, n, h, w = tile_pixels(start, H, W, BLOCK_M)
        offsets = nhwc_offsets(n0, n, h, w, c, H, W, C, s_n, s_h, s_w, s_c, False)
    return offsets


@triton.jit
def nhwc_descriptor(ptr, N, H, W, C, BLOCK_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A TMA descriptor of a dense NHWC [N, H, W, C] tensor at ``ptr``, its boxes
    BLOCK_PIXELS pixels of one image row by BLOCK_C channels."""
    return tl.make_tensor_descriptor(ptr, shape=[N, H, W, C], strides=[H * W * C, W * C, C, 1],
                                     block_shape=[1, 1, BLOCK_PIXELS, BLOCK_C])


@triton.jit
def channel_vector(ptr, c, c_ok):
    """A per-channel vector as fp32 (zero on masked channels)."""
    return tl.load(ptr + c, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def batch_norm_vectors(mean_ptr, scale_ptr, shift_ptr, c, c_ok):
    """The (mean, scale, shift) fp32 channel vectors of a BatchNorm applied on the fly."""
    return (channel_vector(mean_ptr, c, c_ok), channel_vector(scale_ptr, c, c_ok),
            channel_vector(shift_ptr, c, c_ok))


@triton.jit
def normalize(x, mean, scale, shift, RELU: tl.constexpr):
    """(x - mean) * scale + shift on a [BLOCK_M, BLOCK_C] tile (a BatchNorm with its
    statistics folded in); ReLU keeps NaN, as torch."""
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)
    return z


@triton.jit
def load_tile(ptr, offsets, mask):
    """A [pixels, channels] tile as fp32 (masked elements 0)."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, value, offsets, mask):
    """Write a [pixels, channels] tile at ``offsets``, in ptr's dtype."""
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def padded_copy_kernel(x_ptr, out_ptr, in_scale_ptr, in_shift_ptr, total, C, H, W, HP, WP,
                       x_sn, x_sc, x_sh, x_sw, in_scale_s, in_shift_s, PH, PW,
                       PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, CP: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    """out[n, hp, wp, c] = x[n, c, hp - PH, wp - PW] (any strides; with PROLOGUE, through
    ``input_prologue``) where c < C and the pixel is inside x, else 0; out dense
    [N, HP, WP, CP], ``total`` = N*HP*WP pixels."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    n0, n, hp, wp = tile_pixels(start, HP, WP, BLOCK_M)
    h = hp - PH
    w = wp - PW
    c = tl.arange(0, CP)
    pixel_ok = pixel_block(start, total, BLOCK_M)
    inside = pixel_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    source = nhwc_offsets(n0, n, h, w, c, H, W, C, x_sn, x_sh, x_sw, x_sc, False)
    ok = inside[:, None] & (c < C)[None, :]
    value = tl.load(x_ptr + source, mask=ok, other=0.0)
    if PROLOGUE:
        scale = channel_vector(in_scale_ptr, c * in_scale_s, c < C)
        shift = channel_vector(in_shift_ptr, c * in_shift_s, c < C)
        value = input_prologue(value, ok, scale[None, :], shift[None, :], IN_RELU)
    target = start * CP + (tl.arange(0, BLOCK_M)[:, None] * CP + c[None, :])
    tl.store(out_ptr + target, value, mask=pixel_ok[:, None])


def padded_copy_launch(x: torch.Tensor, out: torch.Tensor, padding: tuple[int, int],
                       tile: TileConfig, prologue: InputNormalization | None = None) -> Launch:
    """The launch copying x [N, C, H, W] (any strides), through ``prologue`` where given,
    into ``out``, a dense [N, H', W', CP] tensor (CP >= C; H' >= H + the top ``padding``,
    likewise W'), ``tile.block_m`` pixels of ``out`` a program: ``padded_copy_kernel``. The
    border and the channels past C stay 0 after the prologue."""
    N, C, H, W = x.shape
    _, HP, WP, CP = out.shape
    total = N * HP * WP
    extra = prologue_operands(prologue, x, C)
    return Launch(padded_copy_kernel, (triton.cdiv(total, tile.block_m),),
                  args={"x_ptr": x, "out_ptr": out, **extra.args, "total": total, "C": C,
                        "H": H, "W": W, "HP": HP, "WP": WP, "x_sn": x.stride(0),
                        "x_sc": x.stride(1), "x_sh": x.stride(2), "x_sw": x.stride(3),
                        "PH": padding[0], "PW": padding[1]},
                  extents={"x_ptr": Extent((N, C, H, W), ("x_sn", "x_sc", "x_sh", "x_sw")),
                           "out_ptr": dense(N, HP, WP, CP), **extra.extents},
                  constexprs={**extra.constexprs, "CP": CP, "BLOCK_M": tile.block_m},
                  num_warps=tile.num_warps,
                  name=f"padded_copy[{tile.name}{'+prologue' if prologue else ''}]")


def grid(pixels: int, channels: int, tile: TileConfig) -> tuple[int, int]:
    """The programs of a [pixels x channels] pass: ``tile.block_m`` pixels by
    ``tile.block_n`` channels each."""
    return triton.cdiv(pixels, tile.block_m), triton.cdiv(channels, tile.block_n)


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(n, h, w, c) strides of a 4-D NCHW-shaped tensor, whatever its memory format."""
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


def strided_args(prefix: str, t: torch.Tensor) -> dict[str, int]:
    sn, sh, sw, sc = nhwc_strides(t)
    return {f"{prefix}_sn": sn, f"{prefix}_sh": sh, f"{prefix}_sw": sw, f"{prefix}_sc": sc}


def strided_extent(prefix: str, shape: tuple[int, int, int, int],
                   dtypes: tuple[torch.dtype, ...] = FLOATING, *,
                   dense_nhwc: bool = False) -> Extent:
    """The [N, C, H, W] ``shape`` a kernel indexes through the strides ``strided_args(prefix,
    ...)`` passed it or, ``dense_nhwc``, at the dense channels_last strides it assumes."""
    if dense_nhwc:
        N, C, H, W = shape
        return Extent(tuple(shape), (H * W * C, 1, W * C, C), dtypes)
    return Extent(tuple(shape), (f"{prefix}_sn", f"{prefix}_sc", f"{prefix}_sh", f"{prefix}_sw"),
                  dtypes)


def is_dense_nhwc(t: torch.Tensor) -> bool:
    """Dense channels_last: element (n, c, h, w) at ((n * H + h) * W + w) * C + c (axes of
    size 1 aside, as torch's channels_last contiguity)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def layout_constexprs(tensors: tuple[torch.Tensor | None, ...], tile: TileConfig,
                      span_pixels: int) -> dict[str, bool]:
    """DENSE_NHWC and EVEN_C of a [pixels x channels] kernel over ``tensors`` (None: an
    operand left out), C channels each: DENSE_NHWC when every one is dense channels_last and
    the int32 offsets inside a tile, which reach ``span_pixels`` pixels of one tensor past
    the tile's int64 origin (its first pixel, or its first image), stay below 2^31; EVEN_C
    when the channel block divides C."""
    present = [t for t in tensors if t is not None]
    channels = present[0].shape[1]
    in_int32 = span_pixels * channels + tile.block_n < 2**31
    return {"DENSE_NHWC": in_int32 and all(is_dense_nhwc(t) for t in present),
            "EVEN_C": channels % tile.block_n == 0}


def normalization_operands(channels: int, normalization: Normalization | None,
                           placeholder: torch.Tensor
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Extent]]:
    """The mean_ptr, scale_ptr and shift_ptr arguments of a kernel that normalises its input
    (``batch_norm_vectors``) and their extents: dense fp32 [C] vectors, or ``placeholder``
    (never read) when ``normalization`` is None."""
    names = ("mean_ptr", "scale_ptr", "shift_ptr")
    if normalization is None:
        return dict.fromkeys(names, placeholder), dict.fromkeys(names, UNUSED)
    return (dict(zip(names, normalization)),
            dict.fromkeys(names, dense(channels, dtypes=(torch.float32,))))


def normalization_mark(normalization: Normalization | None, relu: bool) -> str:
    """What a launch's name says of the BatchNorm (+ ReLU) it applies on the fly."""
    if normalization is None:
        return ""
    return "+bn+relu" if relu else "+bn"
