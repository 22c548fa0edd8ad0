"""run_tool turns llama.cpp's extra weight buffers off in the tools that run a model exactly
where open_llama turns them off in-process (ZEROPOINT_LLAMA_EXTRA_BUFFERS, or an AMX CPU)."""

import subprocess

import pytest

from zeropoint.gguf import llama_tools


@pytest.fixture
def commands(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(llama_tools, "tool_path", lambda name: tmp_path / name)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    return ran


@pytest.mark.parametrize("setting, flagged", [("0", True), ("1", False)])
def test_no_repack_follows_the_extra_buffer_setting(commands, monkeypatch, setting, flagged):
    monkeypatch.setenv("ZEROPOINT_LLAMA_EXTRA_BUFFERS", setting)
    llama_tools.run_tool("llama-perplexity", "-m", "x.gguf")
    llama_tools.run_tool("llama-imatrix", "-m", "x.gguf")
    llama_tools.run_tool("llama-quantize", "a.gguf", "b.gguf", "Q4_0")
    perplexity, imatrix, quantize = commands
    assert ("--no-repack" in perplexity) is flagged and ("--no-repack" in imatrix) is flagged
    assert "--no-repack" not in quantize  # llama-quantize runs no model: no such option
    assert perplexity[-2:] == ["-m", "x.gguf"]
