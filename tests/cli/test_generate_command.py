"""`zeropoint generate` against transformers: greedy tokens equal `model.generate(do_sample=False)`
of a Hugging Face model holding the same (dequantized) weights, the chat template equals
`apply_chat_template`, sampling repeats with its seed, and bad options exit with 2."""

import io
import itertools
import json
import subprocess
import sys
import tempfile

import pytest
import torch

from zeropoint.cli import main

PROMPT = "w33 w30 w106"  # greedy ends at the end-of-sequence token after 13 tokens


@pytest.fixture(scope="session")
def tiny_quantized(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "q"
    assert main(["quantize", str(tiny_checkpoint), "-o", str(out), "--group-size", "32",
                 "--quiet"]) == 0
    return out


def hf_with_weights_of(directory):
    """The oracle model: transformers' own architecture from the directory's config, with the
    zeropoint directory's quantized tensors dequantized into its plain float weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from zeropoint.modeldir.format import read_tensors

    _, quantized, kept = read_tensors(directory)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory)).eval()
    state = dict(kept) | {name: q.dequantize() for name, q in quantized.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    if (directory / "generation_config.json").is_file():  # else from_config's, from config.json
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def generate(capsys, *args):
    """(stdout, stderr, the JSON record) of one in-process run."""
    capsys.readouterr()  # drop what came before
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/g.json"
        assert main(["generate", *map(str, args), "--json", path]) == 0
        record = json.loads(open(path).read())
    out = capsys.readouterr()
    return out.out, out.err, record


def oracle_tokens(model, prompt_ids, max_new_tokens, ignore_eos=False):
    if ignore_eos:
        model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_greedy_tokens_of_a_zeropoint_directory_equal_transformers(tiny_quantized, capsys,
                                                                   ignore_eos):
    flags = ["--ignore-eos"] if ignore_eos else []
    stdout, stderr, record = generate(capsys, tiny_quantized, "--prompt", PROMPT,
                                      "--max-tokens", 24, *flags)
    turn = record["turns"][0]
    assert record["engine"] == "zeropoint's compact decoder"
    assert "engine: zeropoint's compact decoder" in stderr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_quantized)
    assert turn["prompt_tokens"] == tokenizer(PROMPT)["input_ids"]
    expected = oracle_tokens(hf_with_weights_of(tiny_quantized), turn["prompt_tokens"], 24,
                             ignore_eos)
    assert turn["tokens"] == expected
    assert len(expected) == (24 if ignore_eos else 13)
    # stdout is the text and nothing else; the timings went to stderr.
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert stdout == text + "\n" and turn["text"] == text
    assert "time to first token" in stderr and "tokens/s" in stderr


def test_greedy_tokens_of_a_float_checkpoint_equal_transformers(tiny_checkpoint, capsys):
    from transformers import AutoModelForCausalLM

    _, _, record = generate(capsys, tiny_checkpoint, "--prompt", "w9 w8 w7", "--max-tokens", 16,
                            "--ignore-eos")
    turn = record["turns"][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert turn["tokens"] == oracle_tokens(model, turn["prompt_tokens"], 16, ignore_eos=True)


def test_sampling_repeats_with_its_seed(tiny_quantized, capsys):
    def sample(seed):
        _, err, record = generate(capsys, tiny_quantized, "--prompt", PROMPT, "--max-tokens", 24,
                                  "--ignore-eos", "--temperature", "1.5", "--top-k", "50",
                                  "--top-p", "0.95", "--seed", seed)
        assert f"seed: {seed}" in err and record["seed"] == seed
        return record["turns"][0]["tokens"]

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first
    greedy = generate(capsys, tiny_quantized, "--prompt", PROMPT, "--max-tokens", 24,
                      "--ignore-eos")[2]["turns"][0]["tokens"]
    assert first != greedy


TEMPLATE = ("{% for m in messages %}{{ 'w10 ' if m['role'] == 'user' else 'w11 ' }}"
            "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w12{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat(tiny_quantized, tmp_path_factory):
    """The tiny quantized directory with a chat template in its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat") / "q"
    shutil.copytree(tiny_quantized, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def test_chat_applies_the_template(tiny_chat, capsys):
    from transformers import AutoTokenizer

    _, _, record = generate(capsys, tiny_chat, "--chat", "--prompt", "w3 w4", "--max-tokens", 8,
                            "--ignore-eos")
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat)
    messages = [{"role": "user", "content": "w3 w4"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert record["turns"][0]["prompt_tokens"] == list(expected)
    assert record["turns"][0]["tokens"] == oracle_tokens(hf_with_weights_of(tiny_chat), expected,
                                                         8, ignore_eos=True)


def test_interactive_keeps_the_conversation(tiny_chat, capsys, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(sys, "stdin", io.StringIO("w3 w4\n\nw5 w6\n"))
    _, _, record = generate(capsys, tiny_chat, "--interactive", "--max-tokens", 6, "--ignore-eos")
    first, second = record["turns"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat)
    reply = tokenizer.decode(first["tokens"], skip_special_tokens=True)
    conversation = [{"role": "user", "content": "w3 w4"}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": "w5 w6"}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert second["prompt_tokens"] == list(expected)
    assert second["tokens"] == oracle_tokens(hf_with_weights_of(tiny_chat), expected, 6,
                                             ignore_eos=True)


@pytest.mark.parametrize("args,message", [
    (["--chat", "--prompt", "w1"], "has no chat template"),
    (["--interactive"], "has no chat template"),
    (["--prompt", "w1", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["--prompt", "w1", "--top-k", "5"], "--top-k is for sampling; give --temperature"),
    (["--prompt", "w1", "--seed", "3", "--top-p", "0.5"], "--top-p, --seed are for sampling"),
    (["--prompt", "w1", "--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["--prompt", "w1", "--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "w1", "--temperature", "1", "--top-k", "-2"], "--top-k must be 0"),
    ([], "give a --prompt"),
    (["--prompt", "w1", "--interactive"], "--prompt and --interactive exclude each other"),
    (["--prompt", "w1", "--max-tokens", "100000"], "exceed the model's context"),
])
def test_bad_options_exit_2_with_a_message(tiny_quantized, capsys, args, message):
    capsys.readouterr()
    assert main(["generate", str(tiny_quantized), *args]) == 2
    err = capsys.readouterr().err
    assert "zeropoint generate: error: " in err and message in err


def test_bad_model_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zeropoint.cli", "generate", str(tmp_path / "x"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- SmolLM2 (slow) ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "q"
    assert main(["quantize", "default", "-o", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_smollm2_chat_greedy_equals_transformers(smollm2_quantized, capsys):
    from transformers import AutoTokenizer

    prompt = "What is the capital of France?"
    _, _, record = generate(capsys, smollm2_quantized, "--chat", "--prompt", prompt,
                            "--max-tokens", 20)
    turn = record["turns"][0]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_quantized)
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert turn["prompt_tokens"] == list(expected_prompt)
    assert record["engine"] == "zeropoint's compact decoder"
    assert turn["tokens"] == oracle_tokens(hf_with_weights_of(smollm2_quantized),
                                           turn["prompt_tokens"], 20)


@pytest.mark.slow
def test_default_gguf_runs_on_llama_cpp_with_the_template(capsys):
    """llama.cpp's engine: the prompt's tokens equal transformers' template of the same GGUF, and
    greedy tokens equal llama.cpp's own greedy completion."""
    from zeropoint.gguf.llama_cpp import open_llama
    from zeropoint.models.source import default_model_path

    prompt = "Name three colors."
    _, err, record = generate(capsys, "default", "--chat", "--prompt", prompt, "--max-tokens", 16,
                              "--ignore-eos")
    assert record["engine"] == "llama.cpp" and "engine: llama.cpp" in err
    turn = record["turns"][0]
    path = default_model_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert turn["prompt_tokens"] == list(expected_prompt)
    llm = open_llama(path, n_ctx=256, logits_all=False)
    try:
        # llama.cpp's own sampler at top_k=1 is greedy; its generator never stops by itself.
        expected = list(itertools.islice(
            llm.generate(turn["prompt_tokens"], top_k=1, temp=0.0, reset=True), 16))
    finally:
        llm.close()
    assert turn["tokens"] == expected


@pytest.fixture(scope="session")
def tiny_qwen2_quantized(tmp_path_factory, bpe_tokenizer):
    """A 2-layer Qwen2 (q/k/v biases: another family) with a BPE tokenizer, quantized."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2")
    vocab = bpe_tokenizer(path)
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=None, bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(path)
    out = path / "q"
    assert main(["quantize", str(path), "-o", str(out), "--group-size", "32", "--quiet"]) == 0
    return out


def test_a_family_beyond_the_compact_decoder_runs_and_says_which_engine(tiny_qwen2_quantized,
                                                                      capsys):
    from zeropoint.models.quantized import load_quantized
    from zeropoint.nn.compact_runtime import supports

    _, err, record = generate(capsys, tiny_qwen2_quantized, "--prompt", "the lazy fox",
                              "--max-tokens", 16)
    compact = supports(load_quantized(tiny_qwen2_quantized).model)
    expected_engine = ("zeropoint's compact decoder" if compact else
                       "transformers with zeropoint's quantized modules (the compact decoder does "
                       "not run model type 'qwen2')")
    assert record["engine"] == expected_engine and f"engine: {expected_engine}" in err
    turn = record["turns"][0]
    assert turn["tokens"] == oracle_tokens(hf_with_weights_of(tiny_qwen2_quantized),
                                           turn["prompt_tokens"], 16)
    assert len(turn["tokens"]) == 16
