"""`zeropoint quantize` and `zeropoint eval` end to end, on a tiny checkpoint built here."""

import json
import subprocess
import sys

import pytest
import torch

import zeropoint.modeldir.writer as writer_module
from zeropoint import load
from zeropoint.cli import main
from zeropoint.models.evaluate import perplexity


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zeropoint.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_quantize_writes_a_directory_that_loads_and_evaluates(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "q"
    text = tiny_checkpoint / "text.txt"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--bits", "4", "--group-size", "32",
                 "--eval", "--text", str(text)]) == 0
    table = capsys.readouterr().out
    assert "bits per weight" in table and "perplexity" in table
    assert {"zeropoint.json", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "zeropoint.json").read_text())
    assert manifest["format"] == "zeropoint" and manifest["version"] == 1
    assert manifest["quantized"]["model.layers.0.mlp.up_proj.weight"]["spec"]["bits"] == 4
    assert "lm_head.weight" not in manifest["quantized"]  # kept in float by default
    loaded = load(out)
    ppl = perplexity(loaded.model, loaded.tokenizer, text.read_text()).perplexity
    assert f"{ppl:.3f}" in table  # the table reports the saved model, not an in-memory one

    json_path = tmp_path / "eval.json"
    assert main(["eval", str(tiny_checkpoint), str(out), "--text", str(text), "--json", str(json_path)]) == 0
    figures = json.loads(json_path.read_text())
    assert figures["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert {"tokens", "bits_per_weight", "bytes"} <= figures.keys()
    assert figures["bits_per_weight"] < figures["reference"]["bits_per_weight"] == pytest.approx(32.0)


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "/no/such/model", "-o", "OUT"], "does not exist"),
        (["quantize", ".", "-o", "OUT"], "has no config.json"),
        (["quantize", "TINY", "-o", "OUT", "--bits", "12"], "bits must be 1..8, got 12"),
        (["quantize", "TINY", "-o", "OUT", "--scheme", "affine"], "unknown scheme 'affine'"),
        (["eval", "/no/such/model"], "does not exist"),
    ],
)
def test_user_errors_exit_2_without_traceback(tiny_checkpoint, tmp_path, args, message):
    args = [str(tiny_checkpoint) if a == "TINY" else a for a in args]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "OUT").exists()


def test_unsupported_architecture_is_named(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper-x", "architectures": ["WhisperXModel"]}))
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    proc = run_cli("quantize", tmp_path, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "whisper-x" in proc.stderr or "WhisperXModel" in proc.stderr


def test_existing_output_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_cli("quantize", tiny_checkpoint, "-o", out, "--group-size", "32", "--quiet")
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    proc = run_cli("quantize", tiny_checkpoint, "-o", out, "--group-size", "32", "--quiet", "--force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --quiet: no table
    assert not (out / "precious.txt").exists() and (out / "zeropoint.json").exists()


def test_a_failed_run_leaves_no_partial_output(tiny_checkpoint, tmp_path, monkeypatch):
    def fail_midway(self, **extra):
        self._flush()  # shards are on disk by now
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(writer_module.CheckpointWriter, "finish", fail_midway)
    with pytest.raises(RuntimeError, match="killed while writing"):
        main(["quantize", str(tiny_checkpoint), "-o", str(tmp_path / "q"), "--group-size", "32", "--quiet"])
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_an_interrupted_run_leaves_no_partial_output(tiny_checkpoint, tmp_path):
    """SIGINT while shards are being written: KeyboardInterrupt unwinds through atomic_path."""
    script = (
        "import os, signal, sys\n"
        "import zeropoint.modeldir.writer as c\n"
        "real = c.CheckpointWriter._flush\n"
        "def flush_then_interrupt(self):\n"
        "    real(self)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "c.CheckpointWriter._flush = flush_then_interrupt\n"
        "from zeropoint.cli import main\n"
        f"sys.exit(main(['quantize', {str(tiny_checkpoint)!r}, '-o', {str(tmp_path / 'q')!r}, "
        "'--group-size', '32', '--quiet']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_eval_prints_the_main_job_table_beside_llama_cpp(tmp_path, capsys):
    """The default recipe with --eval: float, this output and llama.cpp's Q4_K_M of the same
    model, sizes checked against the files themselves (safetensors and gguf-py's reader)."""
    from family_checkpoints import TEXT, tiny_checkpoint
    from gguf import GGUFReader
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = tiny_checkpoint("llama")  # a byte-level BPE tokenizer, which the GGUF export takes
    out, text = tmp_path / "q", tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["quantize", str(tiny), "-o", str(out), "--eval", "--text", str(text),
                 "--max-tokens", "256"]) == 0
    table = capsys.readouterr().out
    lines = table[table.index("beside llama.cpp"):].splitlines()[2:5]
    rows = {ln[:26].strip(): ln[26:].split() for ln in lines}
    assert list(rows) == ["float32", "zeropoint (this output)", "llama.cpp Q4_K_M"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert rows["zeropoint (this output)"][0] == f"{stored / 2**20:.1f}"
    peer = tmp_path / "peer.gguf"
    assert main(["quantize", str(tiny), "--type", "Q4_K_M", "-o", str(peer),
                 "--quiet"]) == 0
    reader = GGUFReader(peer)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    weights = sum(int(t.n_elements) for t in reader.tensors)
    assert rows["llama.cpp Q4_K_M"][0] == f"{nbytes / 2**20:.1f}"
    assert rows["llama.cpp Q4_K_M"][2] == f"{8 * nbytes / weights:.2f}"
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ppl = perplexity(model, AutoTokenizer.from_pretrained(tiny), text.read_text(),
                     max_tokens=256).perplexity
    assert rows["float32"][3] == f"{ppl:.3f}"
    for row in rows.values():
        assert float(row[4]) > 0  # tokens/s
    assert rows["llama.cpp Q4_K_M"][5] == "1.00"
