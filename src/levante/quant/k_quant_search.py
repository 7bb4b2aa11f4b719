"""llama.cpp's K-quant scale searches in numpy, bit for bit: each group's codes and scale.

Our own implementation of ggml-quants.c's `make_qkx2_quants`, `make_qx_quants` and
`make_q3_quants` (without an importance matrix): the same scale search and rounding,
vectorized over groups. A group's values sit in one column of a [n_pos, n_groups] array, so
its sums run in the C loop's order (`sequential_sum`: one float32 add per position), and every
float operation is float32 in the C expression's order (`w * x * l` is (w * x) * l). Rounding
is C's `nearest_int` bit trick (`nearest_int`; np.rint where the argument is provably within
2**22, where both agree) and f16 scales round to nearest even, as GGML_FP32_TO_FP16 does.
llama.cpp's ggml-base is built without FMA contraction, so the bytes are equal.
The block formats built from these: levante.quant.k_quantize.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # below this the group is all zero (ggml-quants.c)

# Expressions below keep C's operand order: `w * x * l` is (w * x) * l, all float32.


def nearest_int(values: np.ndarray) -> np.ndarray:
    """float32 -> int32 as llama.cpp's nearest_int: add 1.5 * 2**23 and read the mantissa.

    Round half to even for |v| <= 2**22 (= np.rint there); larger values wrap as in C.
    Example: 2.5 -> 2, 3.5 -> 4, -0.5 -> 0.
    """
    shifted = (values.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def sequential_sum(values: np.ndarray) -> np.ndarray:
    """[n_pos, n_groups] -> [n_groups]: s = v[0]; s += v[1]; ... (numpy's sum may go pairwise)."""
    total = values[0].copy()
    for row in values[1:]:
        total += row
    return total


def f16_bits_and_value(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 -> (f16 as uint16 bits, that f16 widened back to float32): GGML_FP32_TO_FP16."""
    half = values.astype(np.float16)
    return half.view(np.uint16), half.astype(F32)


def make_qkx2(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
              nstep: int, *, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes 0..nmax per group: search `nstep + 1` scales, keep the least error.

    x, weights: [n_pos, n_groups]. Returns codes [n_pos, n_groups] (float32), scale and the
    (positive) min per group, so that x ~ scale * code - min. A step that wins moves the min
    the next steps start from, as in C.
    """
    low = np.minimum(x.min(axis=0), F32(0))
    high = x.max(axis=0)
    sum_w = sequential_sum(weights)
    sum_x = sequential_sum(weights * x)
    is_flat = high == low
    high = np.where(is_flat, low + F32(1), high)  # flat groups end as zeros; keep them finite
    codes, trial, buffer = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (high - low)
        scale = F32(1) / iscale
        _round_codes(x, low, iscale, 0, nmax, out=codes)
        best_error = _weighted_error(codes, scale, low, x, weights, use_mad, buffer)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (high - low)
            _round_codes(x, low, iscale, 0, nmax, out=trial)
            weighted = np.multiply(weights, trial, out=buffer)
            sum_l = sequential_sum(weighted)
            sum_xl = sequential_sum(weighted * x)
            sum_l2 = sequential_sum(np.multiply(weighted, trial, out=buffer))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min[clamp] = 0
            this_scale[clamp] = (sum_xl / sum_l2)[clamp]
            error = _weighted_error(trial, this_scale, this_min, x, weights, use_mad, buffer)
            better = (det > 0) & (error < best_error) & ~is_flat
            np.copyto(codes, trial, where=better)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    codes[:, is_flat] = 0
    scale[is_flat] = 0
    return codes, scale, -low


def _round_codes(x: np.ndarray, offset: np.ndarray | None, iscale: np.ndarray, lowest: int,
                 highest: int, *, out: np.ndarray) -> np.ndarray:
    """out = clip(nearest_int(iscale * (x - offset)), lowest, highest) as float32 codes.

    With a finite iscale the products stay within a few units of the code range, where
    np.rint equals nearest_int; otherwise (a group spanning only subnormals) take the C trick.
    """
    if offset is None:
        np.multiply(x, iscale, out=out)
    else:
        np.subtract(x, offset, out=out)
        out *= iscale
    if np.isfinite(iscale).all():
        np.rint(out, out=out)
    else:
        out[...] = nearest_int(out)
    return np.clip(out, lowest, highest, out=out)


def _weighted_error(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, x: np.ndarray,
                    weights: np.ndarray, use_mad: bool, buffer: np.ndarray) -> np.ndarray:
    """Sum over positions of w * |diff| (use_mad) or w * diff^2, diff = scale * code + offset - x."""
    diff = np.multiply(codes, scale, out=buffer)
    diff += offset
    diff -= x
    if use_mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff
    diff *= weights
    return sequential_sum(diff)


def signed_max(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first value of largest magnitude, that magnitude) along `axis`, as C's `if (a > amax)`."""
    magnitude = np.abs(values)
    index = np.expand_dims(magnitude.argmax(axis=axis), axis)
    return (np.take_along_axis(values, index, axis).squeeze(axis),
            np.take_along_axis(magnitude, index, axis).squeeze(axis))


def make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes 0..2*nmax-1 (value + nmax) weighted by x^2: make_qx_quants, rmse_type 1.

    Tries the scale nmax / max and 18 neighbours (nmax +- 0.1 k); keeps the best fit.
    x: [n_pos, n_groups]. Returns codes [n_pos, n_groups] (float32) and scale [n_groups].
    """
    peak, magnitude = signed_max(x, 0)
    is_zero = magnitude < GROUP_MAX_EPS
    peak = np.where(is_zero, F32(1), peak)  # zero groups end as zeros; keep them finite
    w = x * x
    wx = w * x
    codes, trial, buffer = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in (0, *range(-9, 0), *range(1, 10)):
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            _round_codes(x, None, iscale, -nmax, nmax - 1, out=trial)
            sumlx = sequential_sum(np.multiply(wx, trial, out=buffer))
            np.multiply(w, trial, out=buffer)
            suml2 = sequential_sum(np.multiply(buffer, trial, out=buffer))
            if step == 0:
                codes[...] = trial
                scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
                best = scale * sumlx
                continue
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            this_scale = sumlx / suml2
            np.copyto(codes, trial, where=better)
            scale = np.where(better, this_scale, scale)
            best = np.where(better, this_scale * sumlx, best)
    codes += nmax
    codes[:, is_zero] = 0
    scale[is_zero] = 0
    return codes, scale


def make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes 0..2*nmax-1 weighted by x^2, refined one value at a time (make_q3_quants).

    Starts from the scale nmax / max, then up to 5 passes move single codes where that
    improves the fit (a pass without a change ends a group's search: the next pass would
    find none either, so running all 5 everywhere gives the same codes).
    """
    peak, magnitude = signed_max(x, 0)
    is_zero = magnitude < GROUP_MAX_EPS
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = np.clip(nearest_int(-F32(nmax) / peak * x), -nmax, nmax - 1)
        codes_f = codes.astype(F32)
        sumlx = sequential_sum(w * x * codes_f)
        suml2 = sequential_sum(w * codes_f * codes_f)
        for _ in range(5):
            for i in range(x.shape[0]):
                xi, wi, li = x[i], w[i], codes_f[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(F32)
                slx = slx + wi * xi * new
                sl2 = sl2 + wi * new * new
                accept = ((sumlx - wi * xi * li > 0) & (new != li) & (sl2 > 0)
                          & (slx * slx * suml2 > sumlx * sumlx * sl2))
                codes_f[i] = np.where(accept, new, li)
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    codes = codes_f.astype(np.int32) + nmax
    codes[:, is_zero] = 0
    scale[is_zero] = 0
    return codes, scale


def requantize(x: np.ndarray, step: np.ndarray, offset: np.ndarray | None, low: int, high: int,
               codes: np.ndarray, shift: int) -> np.ndarray:
    """Codes from the final (f16-rounded) scales: clip(round((x + offset) / step)) + shift.

    Groups whose step is 0 keep their search codes (C's `if (!d) continue`).
    x, codes: [n_pos, n_groups]; step, offset: [n_groups].
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shifted = x if offset is None else x + offset
        fresh = np.clip(nearest_int(shifted / step), low, high) + shift
    return np.where(step != 0, fresh, codes.astype(np.int32))
