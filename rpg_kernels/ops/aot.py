"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU.

``compile_kernel`` builds PTX and a cubin for ``sm_80`` (A100: ``mma.sync``) or ``sm_90`` (H100:
``wgmma``) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and runs the
``ptxas`` shipped in the Triton wheel with ``-v`` to read the register count and spills. Tests use
it to check that every kernel configuration the package can launch compiles, and does not spill.

Example::

    art = compile_kernel(my_kernel, {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                         {"BLOCK": 128}, cc=90, num_warps=4)
    art.has_wgmma, art.registers, art.spill_bytes
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_CC = (80, 90)


@dataclass
class CompiledKernel:
    """What one ahead-of-time compilation produced (PTX text, cubin bytes and ptxas numbers)."""

    name: str
    cc: int
    ptx: str
    cubin: bytes
    shared_bytes: int
    num_warps: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    ptxas_log: str
    sass: str = field(repr=False, default="")
    metadata: Any = field(repr=False, default=None)

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def mma_loop_spills(self) -> int:
        """Spill instructions (``STL``/``LDL``) inside the loops that issue tensor-core MMAs (the K loops):
        spills there cost every iteration; a few outside them (set-up, epilogue) are harmless."""
        return sum(count for _, count in mma_loops(self.sass))

    @property
    def has_wgmma(self) -> bool:
        """True when the PTX uses Hopper warp-group MMA (``wgmma.mma_async``)."""
        return "wgmma.mma_async" in self.ptx

    @property
    def has_mma(self) -> bool:
        """True when the PTX uses any tensor-core MMA (``mma.sync`` or ``wgmma``)."""
        return self.has_wgmma or "mma.sync" in self.ptx


def ptxas_path() -> str:
    """The ``ptxas`` binary shipped inside the Triton wheel (override with ``TRITON_PTXAS_PATH``)."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptx_arch(ptx: str, cc: int) -> str:
    match = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    return match.group(1) if match else f"sm_{cc}"


def ptxas_stats(ptx: str, cc: int) -> tuple[int, int, int, str]:
    """Run ``ptxas -v`` on ``ptx``; return ``(registers, spill_store_bytes, spill_load_bytes, log)``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = os.path.join(tmp, "kernel.cubin")
        cmd = [ptxas_path(), "-v", f"--gpu-name={_ptx_arch(ptx, cc)}", src, "-o", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    return max(regs, default=0), sum(stores), sum(loads), log


def nvdisasm_path() -> str:
    """The ``nvdisasm`` shipped inside the Triton wheel, beside ``ptxas``."""
    return os.path.join(os.path.dirname(ptxas_path()), "nvdisasm")


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin (``nvdisasm -c``: code sections, one instruction per line with its address)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def mma_loops(sass: str) -> list[tuple[tuple[int, int], int]]:
    """``((start, end), spill instructions)`` for every innermost loop of ``sass`` that issues an MMA.

    A loop is a branch back to an earlier label; "innermost" means it contains no other such loop.
    """
    labels, lines, pending = {}, [], []
    for raw in sass.splitlines():
        if match := _LABEL.match(raw.strip()):
            pending.append(match.group(1))
            continue
        if match := _ADDRESS.search(raw):
            address = int(match.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            lines.append((address, match.group(2)))
    loops = []
    for address, text in lines:
        if (match := _BRANCH.search(text)) and labels.get(match.group(1), address + 1) <= address:
            loops.append((labels[match.group(1)], address))
    innermost = [
        (a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)
    ]
    out = []
    for start, end in innermost:
        body = [text for address, text in lines if start <= address <= end]
        if any(op in text for text in body for op in ("HGMMA", "HMMA")):
            out.append(((start, end), sum(bool(re.search(r"\b(STL|LDL)\b", text)) for text in body)))
    return out


def signature_of(fn: Any, types: dict[str, str], default: str = "i32") -> dict[str, str]:
    """Full ``ASTSource`` signature of ``fn``: ``types`` for named arguments, ``"constexpr"`` for
    ``tl.constexpr`` ones, ``default`` (``"i32"``) for the rest (sizes, strides)."""
    import triton

    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    unknown = set(types) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    return {
        name: "constexpr" if param.is_constexpr else types.get(name, default)
        for name, param in zip(fn.arg_names, fn.params)
    }


def compile_kernel(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any] | None = None,
    *,
    cc: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: tuple[str, ...] | None = None,
    run_ptxas: bool = True,
) -> CompiledKernel:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_{cc}`` and return its PTX, cubin and stats.

    ``signature`` maps every argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the values of the ``constexpr`` ones.
    ``divisible_by_16`` names the arguments Triton's launcher would specialise as multiples of 16
    (it does so at run time for 16-byte aligned pointers and integers that are multiples of 16);
    default: every pointer, as for PyTorch allocations.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if cc not in SUPPORTED_CC:
        raise ValueError(f"cc must be one of {SUPPORTED_CC}, got {cc}")
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap an Autotuner / Heuristics
        fn = fn.fn
    if divisible_by_16 is None:
        divisible_by_16 = tuple(name for name, ty in signature.items() if ty.startswith("*"))
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs or {}), attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    ptx = compiled.asm["ptx"]
    regs = stores = loads = 0
    log = sass = ""
    if run_ptxas:
        regs, stores, loads, log = ptxas_stats(ptx, cc)
        sass = disassemble(compiled.asm["cubin"])
    return CompiledKernel(
        name=fn.__name__,
        cc=cc,
        ptx=ptx,
        cubin=compiled.asm["cubin"],
        shared_bytes=int(compiled.metadata.shared),
        num_warps=num_warps,
        registers=regs,
        spill_store_bytes=stores,
        spill_load_bytes=loads,
        ptxas_log=log,
        sass=sass,
        metadata=compiled.metadata,
    )
