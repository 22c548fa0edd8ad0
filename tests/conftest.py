import os

# Spinning OpenMP workers (torch's and llama.cpp's) starve each other on 2 shared cores; passive
# waiting must be set before torch loads, which is why it is here at the top.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are deterministic and do not race the 2-core machine against itself.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer Llama with a word-level tokenizer, saved as a Hugging Face checkpoint, with a
    600-word text.txt beside it: the model every command-line test quantizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(120)]
    path = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "text.txt").write_text(" ".join(words[(i * 7) % 120] for i in range(600)))
    return path


@pytest.fixture(scope="session")
def llama_tools():
    """The directory of llama.cpp's tools (scripts/build-llama-tools.sh). Skipped where they are
    not built, except under CI, where setup builds them and their absence is a failure."""
    from zeropoint.gguf.llama_tools import tools_available, tools_dir

    if not tools_available():
        message = f"llama.cpp tools not built in {tools_dir()}: run scripts/build-llama-tools.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tools_dir()


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Gemma 3 270M's GGUF file (Q4_K_M mix), assembled once into the user cache."""
    from zeropoint.models.source import gemma3_model_path

    return gemma3_model_path()


@pytest.fixture(scope="session")
def ray_cluster():
    """The address of a Ray cluster of this test session's own: `ray start --head --block` on the
    loopback address with 2 CPUs, token authentication off, ended (with the Ray processes it
    started, and no other) when the session ends. Skipped where Ray is not installed."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver's side must agree with the cluster
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    head = subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([Path(sys.executable).parent / "ray", "status",
                              f"--address=127.0.0.1:{port}"], env=env,
                             capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the test's Ray cluster did not start (exit {head.poll()})")
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # --block stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
