"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity), which
llama-cpp-python does not bind: built once per machine by scripts/build-llama-tools.sh and used
as the oracle and the peer for imatrix values, weighted and i-quant bytes and KL-divergence."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

LLAMA_TOOLS_VERSION = "0.3.36"  # the llama-cpp-python sdist the tools are built from
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# The tools that load a model to run it, and so take common_params' --no-repack.
RUNNING_TOOLS = ("llama-imatrix", "llama-perplexity")


def tools_dir() -> Path:
    """Where build-llama-tools.sh puts the binaries: $ZEROPOINT_LLAMA_TOOLS/bin, by default
    ~/.cache/zeropoint/llama-tools-<version>/bin."""
    root = os.environ.get("ZEROPOINT_LLAMA_TOOLS")
    base = Path(root) if root else (
        Path.home() / ".cache" / "zeropoint" / f"llama-tools-{LLAMA_TOOLS_VERSION}")
    return base / "bin"


def tool_path(name: str) -> Path:
    """The path of llama.cpp tool `name`; FileNotFoundError saying how to build it if missing."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; accepted: {', '.join(TOOLS)}")
    path = tools_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"{name} is not built at {path}: run scripts/build-llama-tools.sh")
    return path


def tools_available() -> bool:
    return all((tools_dir() / name).is_file() for name in TOOLS)


def run_tool(name: str, *args: str | os.PathLike, check: bool = True,
             **kwargs) -> subprocess.CompletedProcess:
    """Run llama.cpp tool `name` with `args`, capturing its output as text. With `check`, a
    non-zero exit raises RuntimeError carrying the tool's last lines of output.

    Where open_llama keeps llama.cpp's extra weight buffers off (AMX CPUs, whose AMX matmul
    segfaulted in the sandbox zeropoint was built in), the tools that run a model get
    --no-repack, which turns off the same buffers: their figures stay those of plain ggml
    kernels, as in-process llama.cpp computes them."""
    from .llama_cpp import extra_buffers_enabled

    flags = ["--no-repack"] if name in RUNNING_TOOLS and not extra_buffers_enabled() else []
    cmd = [str(tool_path(name)), *flags, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"{name} exited with {done.returncode}:\n{tail}")
    return done
