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
