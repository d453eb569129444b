"""Compile every Triton kernel variant muxc launches for a Hopper GPU, with no GPU present.

Run in a process where ``TRITON_INTERPRET`` is unset, so ``@triton.jit`` builds real
JITFunctions; ``triton.compile`` then lowers each variant through TTIR/TTGIR/LLVM to PTX and
a cubin (ptxas ships with triton). This catches what the interpreter cannot: type errors in
pointer casts, early returns, dot shapes/dtypes, shared-memory limits of the largest tiles.
Also checks the largest tiles fit H100 shared memory. Prints ``compiled N``; exits 1 on
the first failure.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from muxc.kernels import _triton
from muxc.kernels import ia3 as ia3_mod
from muxc.kernels import lora as lora_mod


def variants():
    """(kernel, signature, constexprs, config) for every launch the launchers make."""
    biggest = lambda cands: max(cands, key=lambda c: c.block_m * c.block_n * c.block_r)  # noqa
    for dt in ("fp32", "fp16", "bf16"):
        p, ieee = "*" + dt, dt == "fp32"
        cfg = biggest(lora_mod._SHRINK_CANDIDATES)
        for w_is_b in (False, True):
            yield lora_mod._lora_shrink_kernel, dict(
                x_ptr=p, tab_ptr="*i64", scale_ptr="*fp32", tiles_ptr="*i32", u_ptr="*fp32",
                K="i32", stride_xm="i32"), dict(
                W_FIELD=4 + w_is_b, W_IS_B=w_is_b, SCALED=w_is_b, IEEE=ieee,
                BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_R=cfg.block_r), cfg
        cfg = biggest(lora_mod._EXPAND_CANDIDATES)
        for w_is_b, acc in ((True, True), (True, False), (False, False)):
            yield lora_mod._lora_expand_kernel, dict(
                u_ptr="*fp32", tab_ptr="*i64", scale_ptr="*fp32", tiles_ptr="*i32", out_ptr=p,
                C="i32", stride_om="i32"), dict(
                W_FIELD=5 if w_is_b else 4, W_IS_B=w_is_b, SCALED=w_is_b, ACCUMULATE=acc,
                IEEE=ieee, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r), cfg
        cfg = biggest(lora_mod._GRAD_CANDIDATES)
        for out_is_b in (False, True):
            yield lora_mod._lora_grad_kernel, dict(
                g_ptr=p, u_ptr="*fp32", tab_ptr="*i64", scale_ptr="*fp32", C="i32",
                stride_gm="i32"), dict(
                OUT_FIELD=7 if out_is_b else 6, OUT_IS_B=out_is_b, SCALED=out_is_b, IEEE=ieee,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r), cfg
        cfg = max(ia3_mod._SCALE_CANDIDATES, key=lambda c: c.block_m * c.block_n)
        yield ia3_mod._ia3_scale_kernel, dict(
            h_ptr=p, tab_ptr="*i64", tiles_ptr="*i32", z_ptr=p, N="i32", stride_m="i32"), dict(
            V_FIELD=4, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg
        cfg = max(ia3_mod._GRAD_CANDIDATES, key=lambda c: c.block_m * c.block_n)
        yield ia3_mod._ia3_grad_kernel, dict(
            dz_ptr=p, h_ptr=p, tab_ptr="*i64", N="i32", stride_m="i32"), dict(
            OUT_FIELD=5, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg


H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


def main() -> int:
    if _triton.interpreting():
        print("TRITON_INTERPRET is set: unset it to compile for the GPU", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", 90, 32)
    n = 0
    for fn, sig, consts, cfg in variants():
        try:
            k = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        except Exception as exc:
            print(f"FAILED {fn.__name__} {consts} {cfg}: {exc}", file=sys.stderr)
            return 1
        if k.metadata.shared > H100_SHARED:
            print(f"FAILED {fn.__name__} {consts} {cfg}: needs {k.metadata.shared} B of shared "
                  f"memory, H100 has {H100_SHARED}", file=sys.stderr)
            return 1
        n += 1
    print(f"compiled {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
