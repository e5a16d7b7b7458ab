"""Compile every launchable kernel configuration for ``sm_<cc>`` without a GPU; print JSON results.

Run by ``test_compile.py`` in a subprocess WITHOUT ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` gives objects that cannot be compiled). Usage: ``python tests/ops/compile_worker.py 90``.

What "every configuration" means here: each kernel of ``linear_logprobs_forward`` and
``linear_logprobs_backward`` x each operand dtype (fp16, bf16, fp32) x each constexpr flag x each
entry of its autotune set (``tile_configs.configs_for``), specialised as PyTorch launches it on LLM
shapes (16-byte aligned pointers; ``H`` and row strides multiples of 16). Plus, for the default-path
kernels (forward, backward_dz) and each dtype class, the first config without the integer hints
(odd ``H``): correct but not tuned.
"""

import json
import sys
import time

from rpg_kernels.ops import linear_logprobs_backward, linear_logprobs_forward
from rpg_kernels.ops.aot import compile_kernel, signature_of
from rpg_kernels.ops.tile_configs import configs_for, dtype_class


def cases(cc: int):
    variants = list(linear_logprobs_forward.aot_variants()) + list(linear_logprobs_backward.aot_variants())
    unaligned_done = set()
    for family, kernel, types, constexprs in variants:
        dtype = types["hidden_ptr"].lstrip("*")
        for index, cfg in enumerate(configs_for(family, cc, dtype_class(dtype))):
            yield family, kernel, types, constexprs, dtype, cfg, True
            key = (family, dtype_class(dtype))
            default_path = family in ("forward", "backward_dz")
            if default_path and index == 0 and key not in unaligned_done and dtype != "fp16":
                unaligned_done.add(key)
                yield family, kernel, types, constexprs, dtype, cfg, False


def main(cc: int) -> None:
    results = []
    for family, kernel, types, constexprs, dtype, cfg, aligned in cases(cc):
        signature = signature_of(kernel, types)
        divisible = [name for name, ty in signature.items() if ty.startswith("*")]
        if aligned:
            divisible += [name for name in signature if name == "H" or name.startswith("stride")]
        start = time.time()
        art = compile_kernel(
            kernel,
            signature,
            {**constexprs, **cfg.meta()},
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
                constexprs=constexprs,
                config=cfg.meta(),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                aligned=aligned,
                cc=cc,
                wgmma=art.has_wgmma,
                mma=art.has_mma,
                registers=art.registers,
                spill_bytes=art.spill_bytes,
                shared_bytes=art.shared_bytes,
                seconds=round(time.time() - start, 2),
            )
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]))
