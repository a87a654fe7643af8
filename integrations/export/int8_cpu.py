"""Whether this CPU's int8 convolutions can saturate, which decides the int8 weight form.

x86 CPUs without VNNI multiply uint8 activations by int8 weights with ``vpmaddubsw``, which
adds each pair of products into a signed 16-bit integer and clamps it there; onnxruntime's U8S8
kernels and OpenVINO's CPU plugin use it on such CPUs (onnxruntime's quantization guide, "when
to use reduce_range"; NNCF's ``OverflowFix``). With VNNI (AVX512-VNNI, AVX-VNNI) or AMX the
products accumulate in int32 and nothing clamps; ARM's dot products do not clamp either.

A *portable* int8 export avoids the clamp on every CPU, at some cost in speed or precision:
onnxruntime gets uint8 weights (U8U8, which onnxruntime documents as free of the clamp, and whose
kernels are slower) and OpenVINO 7-bit weights (NNCF's overflow fix on every layer). ExecuTorch's
XNNPACK int8 (signed activations and weights) is the same either way; its int8 tests pass on an
AVX2-only host. Measured on an
AVX2-only AMD EPYC, a random MobileNetV2's int8 online step (onnxruntime, U8S8) was 26% of its
output range away from the same graph's QDQ reference and agreed with float32 on 69% of top-1
frames against the reference's 81%; as U8U8 it equalled the reference exactly.
"""

import functools
import platform

__all__ = ["saturating_int8", "portable_default"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo names of the non-clamping int8 dot products


@functools.cache
def saturating_int8() -> bool:
    """True on an x86 CPU without VNNI or AMX, whose uint8 x int8 convolutions may clamp sums at 16 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return not any(flag in flags for flag in _VNNI_FLAGS)
    except OSError:  # not Linux: numpy's own CPU probe (AVX-VNNI and AMX are not in it)
        try:
            from numpy._core._multiarray_umath import __cpu_features__
        except ImportError:
            return True  # unknown: assume the clamp, which a portable export avoids
        return not __cpu_features__.get("AVX512VNNI", False)


def portable_default(portable: bool | None) -> bool:
    """``portable`` as given, or True where this CPU's int8 kernels would saturate (the export is run here)."""
    return saturating_int8() if portable is None else bool(portable)
