"""Compile the token-loss epilogue for ``sm_<cc>`` without a GPU; print one JSON list of results.

Run by ``test_token_loss_epilogue.py`` in a subprocess WITHOUT ``TRITON_INTERPRET`` (under the
interpreter ``triton.jit`` gives objects that cannot be compiled). Usage::

    python tests/ops/epilogue_aot_worker.py 90          # a covering set of launches
    python tests/ops/epilogue_aot_worker.py 80 --all    # every constexpr combination
"""

import itertools
import json
import sys

import torch

from rpg_kernels import LossConfig
from rpg_kernels.config import KL_ESTIMATORS, KLS
from rpg_kernels.ops import aot
from rpg_kernels.ops import token_loss_epilogue as epilogue

POINTERS = (
    "logp_ptr",
    "old_ptr",
    "ref_ptr",
    "adv_ptr",
    "weight_ptr",
    "loss_ptr",
    "grad_ptr",
    "kl_ptr",
    "ratio_ptr",
)
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}

# (algo, overrides, compute dtype, log-prob input type): every ALGO x CLIP_MODE pair, every KL code,
# both compute dtypes and the half-precision inputs appear.
COVERING_SET = [
    ("rpg", dict(kl="fkl", clip_mode="none"), torch.float32, "bf16"),
    ("rpg", dict(kl="urkl", clip_mode="dual"), torch.float64, "fp64"),
    ("rpg_reinforce", dict(kl="rkl", clip_mode="none"), torch.float32, "fp16"),
    ("rpg_reinforce", dict(kl="ufkl", clip_mode="truncate"), torch.float32, "fp32"),
    ("rpg_reinforce", dict(kl="urkl", clip_mode="dual"), torch.float32, "bf16"),
    ("grpo", dict(kl_estimator="k3", clip_mode="dual"), torch.float32, "fp32"),
    ("grpo", dict(kl_estimator=None, clip_mode="none"), torch.float64, "fp64"),
    ("cispo", dict(kl_estimator="k2", clip_mode="dual"), torch.float32, "fp32"),
    ("cispo", dict(kl_estimator="k1", clip_mode="none"), torch.float32, "fp32"),
    ("grpo", dict(kl_estimator="k3_is", clip_mode="dual"), torch.float32, "fp32"),
]


def every_combination():
    """Every (ALGO, KL, CLIP_MODE) the package can launch, times both compute dtypes."""
    configs = {}
    cases = [("rpg", dict(kl=kl, clip_mode=m)) for kl in KLS for m in ("none", "dual")]
    cases += [("rpg_reinforce", dict(kl=kl, clip_mode=m)) for kl in KLS for m in ("none", "truncate", "dual")]
    for algo, est, mode in itertools.product(("grpo", "cispo"), (None,) + KL_ESTIMATORS, ("none", "dual")):
        cases.append((algo, dict(kl_estimator=est, clip_mode=mode)))
    for algo, overrides in cases:
        for dtype in (torch.float32, torch.float64):
            cfg = LossConfig.preset(algo, **overrides)
            configs[tuple(epilogue.kernel_constexprs(cfg, dtype).values())] = (cfg, dtype, DTYPE_NAMES[dtype])
    return list(configs.values())


def compile_one(cfg, cc, compute_dtype, input_type, run_ptxas):
    compute = DTYPE_NAMES[compute_dtype]
    types = {name: f"*{compute}" for name in POINTERS}
    types.update(
        logp_ptr=f"*{input_type}",
        params_ptr=f"*{compute}",
        mask_ptr="*i8",
        zone_ptr="*i8",
        n_tokens="i64",
        adv_div="i64",
    )
    constexprs = epilogue.kernel_constexprs(cfg, compute_dtype)
    kernel = epilogue.token_loss_epilogue_kernel
    constexprs = dict(constexprs, BLOCK=epilogue.DEFAULT_BLOCK)
    art = aot.compile_kernel(
        kernel,
        aot.signature_of(kernel, types),
        constexprs,
        cc=cc,
        num_warps=epilogue.NUM_WARPS,
        run_ptxas=run_ptxas,
    )
    target = next(line.split()[1] for line in art.ptx.splitlines() if line.startswith(".target"))
    return dict(
        constexprs={
            k: (str(v).split(".")[-1] if k == "COMPUTE" else v) for k, v in constexprs.items() if k != "BLOCK"
        },
        cubin_bytes=len(art.cubin),
        has_entry=".entry token_loss_epilogue_kernel" in art.ptx,
        target=target,
        registers=art.registers if run_ptxas else None,
        spill_bytes=art.spill_bytes if run_ptxas else None,
    )


def main(argv):
    cc = int(argv[0])
    if "--all" in argv:
        jobs = [(cfg, dtype, input_type, False) for cfg, dtype, input_type in every_combination()]
    else:
        jobs = [(LossConfig.preset(a, **o), dtype, t, True) for a, o, dtype, t in COVERING_SET]
    print(json.dumps([compile_one(cfg, cc, dtype, t, ptxas) for cfg, dtype, t, ptxas in jobs]))


if __name__ == "__main__":
    main(sys.argv[1:])
