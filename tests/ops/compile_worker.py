"""Compile every kernel configuration the package can launch for ``sm_<cc>`` without a GPU; print JSON.

Run by ``test_compile.py`` in a subprocess WITHOUT ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` gives objects that cannot be compiled). Usage::

    python tests/ops/compile_worker.py 90           # every kernel module's launches
    python tests/ops/compile_worker.py 80 --every   # every constexpr combination of the epilogue

"Every configuration": each variant of each kernel module's ``aot_variants()`` (operand dtypes, constexpr
flags) x, for the tiled matmul kernels, each entry of their autotune set (``tile_configs.configs_for``),
specialised as PyTorch launches them on LLM shapes (16-byte aligned pointers; ``H`` and row strides
multiples of 16), plus the first tile config of each matmul kernel without the integer hints (odd ``H``).
"""

import json
import sys
import time

from rpg_kernels.ops import (
    linear_logprobs_backward,
    linear_logprobs_forward,
    logit_rows,
    token_loss_epilogue,
)
from rpg_kernels.ops.aot import compile_kernel, mma_loops, signature_of
from rpg_kernels.ops.tile_configs import KERNELS, TileConfig, configs_for, dtype_class

# kernels launched with one configuration (no autotuning): their warps, and the pointer naming the dtype
FIXED_LAUNCH = {
    "logit_rows": (logit_rows.NUM_WARPS, "dz_ptr"),
    "token_loss_epilogue": (token_loss_epilogue.NUM_WARPS, "logp_ptr"),
}


def variants(every: bool = False):
    """Every kernel module's launches; with ``every``, the epilogue's every constexpr combination only."""
    if every:
        yield from token_loss_epilogue.aot_variants(every=True)
        return
    yield from linear_logprobs_forward.aot_variants()
    yield from linear_logprobs_backward.aot_variants()
    yield from logit_rows.aot_variants()
    yield from token_loss_epilogue.aot_variants()


def cases(cc: int, every: bool = False):
    """``(family, kernel, types, constexprs, dtype, launch config, aligned)`` for every compilation."""
    unaligned_done = set()
    for family, kernel, types, constexprs in variants(every):
        if family in FIXED_LAUNCH:
            warps, dtype_arg = FIXED_LAUNCH[family]
            yield (
                family,
                kernel,
                types,
                constexprs,
                types[dtype_arg].lstrip("*"),
                TileConfig(0, 0, 0, warps),
                True,
            )
            continue
        assert family in KERNELS, family
        dtype = types["hidden_ptr"].lstrip("*")
        for index, cfg in enumerate(configs_for(family, cc, dtype_class(dtype))):
            yield family, kernel, types, constexprs, dtype, cfg, True
            key = (family, dtype_class(dtype))
            if index == 0 and key not in unaligned_done and dtype != "fp16":
                unaligned_done.add(key)
                yield family, kernel, types, constexprs, dtype, cfg, False


def main(cc: int, every: bool) -> None:
    results = []
    for family, kernel, types, constexprs, dtype, cfg, aligned in cases(cc, every):
        signature = signature_of(kernel, types)
        divisible = [name for name, ty in signature.items() if ty.startswith("*")]
        if aligned:
            divisible += [name for name in signature if name == "H" or name.startswith("stride")]
        tiles = cfg.meta() if family in KERNELS else {}
        start = time.time()
        art = compile_kernel(
            kernel,
            signature,
            {**constexprs, **tiles},
            cc=cc,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            divisible_by_16=tuple(divisible),
        )
        results.append(
            dict(
                family=family,
                kernel=art.name,
                dtype=dtype,
                constexprs={k: str(v).split(".")[-1] for k, v in constexprs.items()},
                config=tiles,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                aligned=aligned,
                cc=cc,
                target=next(line.split()[1] for line in art.ptx.splitlines() if line.startswith(".target")),
                cubin_bytes=len(art.cubin),
                wgmma=art.has_wgmma,
                mma=art.has_mma,
                registers=art.registers,
                spill_bytes=art.spill_bytes,
                mma_loop_spills=art.mma_loop_spills,
                mma_loops=len(mma_loops(art.sass)),
                shared_bytes=art.shared_bytes,
                seconds=round(time.time() - start, 2),
            )
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]), "--every" in sys.argv[2:])
