"""GPTQ into GGUF files (zeropoint.gguf.gptq) on a tiny Llama: the file is read back by gguf-py
and run by llama.cpp, and compared with the model GPTQ left behind in transformers."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from test_export import TEXT, compare, hf_logits, llama_logits, make_tiny_llama

from zeropoint.cli import main
from zeropoint.gguf.export import export_hf, gguf_name, permute_qk
from zeropoint.gguf.gptq import gptq_gguf
from zeropoint.models.load import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """make_tiny_llama's checkpoint with 256-wide MLPs, so that ffn_down rows hold whole Q3_K
    super-blocks while every other row (64 values) falls back to Q4_0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_gptq")
    make_tiny_llama(path)
    config = LlamaConfig.from_pretrained(path)
    config.intermediate_size = 256
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "calib.txt").write_text(TEXT)
    return path


def read_tensors(path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (type, float32 values in torch order), decoded by gguf-py alone."""
    out = {}
    for t in GGUFReader(path).tensors:
        values = gguf_dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(values)).view(shape))
    return out


def gptq_file(tiny_dir, out, target):
    """gptq_gguf of the tiny model into `out`: (the model, left holding its GPTQ weights, and
    the file's tensors as gguf-py reads them)."""
    loaded = load_model(tiny_dir, progress=False)
    ids = torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(0))
    report = gptq_gguf(loaded, out, target, ids)
    assert report.gptq_tensors == 2 * 7
    return loaded, read_tensors(out)


def assert_llama_cpp_agrees(out, loaded, tensors):
    """llama.cpp runs the file and computes what transformers computes with the file's weights
    put into the model (q/k rows back in transformers' order)."""
    model, config = loaded.model, loaded.model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    with torch.no_grad():
        for hf_name, p in model.named_parameters():
            name = gguf_name(hf_name)
            if name in tensors:
                v = tensors[name][1]
                n_head = heads.get(name.split(".")[2], 0) if name.startswith("blk.") else 0
                if n_head:
                    v = v[torch.argsort(permute_qk(torch.arange(v.shape[0]), n_head))]
                p.copy_(v)
    tokens = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:200]
    _, mean, same_top = compare(llama_logits(out, tokens), hf_logits(model, tokens))
    assert mean < 0.1 and same_top > 0.85


def test_q3_k_file_holds_the_gptq_weights_and_runs_in_llama_cpp(tiny_dir, tmp_path):
    out = tmp_path / "gptq_q3_k.gguf"
    loaded, tensors = gptq_file(tiny_dir, out, "Q3_K")
    model = loaded.model  # its Linears now hold the dequantized GPTQ weights
    heads = {"q_proj": 4, "k_proj": 2}
    for i in range(2):
        for hf, gg, want in (("self_attn.q_proj", "attn_q", "Q4_0"),
                             ("self_attn.k_proj", "attn_k", "Q4_0"),
                             ("self_attn.v_proj", "attn_v", "Q4_0"),
                             ("mlp.down_proj", "ffn_down", "Q3_K")):
            qtype, values = tensors[f"blk.{i}.{gg}.weight"]
            w = model.get_submodule(f"model.layers.{i}.{hf}").weight.detach()
            n_head = heads.get(hf.split(".")[1], 0)
            assert qtype == want
            assert torch.equal(values, permute_qk(w, n_head) if n_head else w)
    # Tensors outside the decoder's Linears are the type's own quantization, as a plain export.
    export_hf(tiny_dir, tmp_path / "rtn.gguf", "Q3_K")
    rtn = read_tensors(tmp_path / "rtn.gguf")
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_norm.weight"):
        assert torch.equal(tensors[name][1], rtn[name][1]) and tensors[name][0] == rtn[name][0]
    assert not torch.equal(tensors["blk.0.ffn_down.weight"][1], rtn["blk.0.ffn_down.weight"][1])
    assert_llama_cpp_agrees(out, loaded, tensors)


def test_cli_writes_gptq_q4_0(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q4_0.gguf"
    main(["quantize", str(tiny_dir), "--method", "gptq", "--type", "Q4_0", "-o", str(out),
          "--calib", str(tiny_dir / "calib.txt"), "--calib-tokens", "256"])
    printed = capsys.readouterr().out
    assert "gptq: 14 tensors, 1 x 256 calibration tokens" in printed
    types = {t for t, _ in read_tensors(out).values()}
    assert "Q4_0" in types and not types & {"Q4_1", "Q3_K"}


def test_q4_k_m_file_mixes_k_and_legacy_grids_and_runs_in_llama_cpp(tiny_dir, tmp_path):
    # Q4_K_M gives ffn_down (256-wide rows) Q4_K or Q6_K, attn_v Q6_K, and the 64-wide rows
    # fall back to legacy types: every decoder Linear is written by GPTQ on its own type's grid.
    out = tmp_path / "gptq_q4_k_m.gguf"
    loaded, tensors = gptq_file(tiny_dir, out, "Q4_K_M")
    model = loaded.model
    types = set()
    heads = {"attn_q": 4, "attn_k": 2}
    for name, (qtype, values) in tensors.items():
        if not name.startswith("blk.") or name.endswith("norm.weight"):
            continue
        hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}[name.split(".")[2]]
        w = model.get_submodule(f"model.layers.{name.split('.')[1]}.{hf}").weight.detach()
        n_head = heads.get(name.split(".")[2], 0)
        assert torch.equal(values, permute_qk(w, n_head) if n_head else w), name
        types.add(qtype)
    assert {"Q4_K", "Q6_K"} <= types and types & {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"}
    assert_llama_cpp_agrees(out, loaded, tensors)


def test_iq4_xs_file_holds_the_gptq_weights_and_runs_in_llama_cpp(tiny_dir, tmp_path):
    # IQ4_XS with an importance matrix: ffn_down (256-wide rows) IQ4_XS, the 64-wide rows fall
    # back to IQ4_NL; GPTQ writes both on llama.cpp's steps, and gguf-py reads back the very
    # weights GPTQ left in the model.
    out = tmp_path / "gptq_iq4_xs.gguf"
    loaded = load_model(tiny_dir, progress=False)
    ids = torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    columns = {}

    def importance(name):
        if not name.startswith("blk."):
            return None
        n = 256 if name.endswith("ffn_down.weight") else 64
        return columns.setdefault(n, (torch.rand(n, generator=gen) + 0.1).numpy())

    report = gptq_gguf(loaded, out, "IQ4_XS", ids, importance=importance)
    assert report.gptq_tensors == 2 * 7
    tensors = read_tensors(out)
    heads = {"attn_q": 4, "attn_k": 2}
    for i in range(2):
        for hf, gg, want in (("self_attn.q_proj", "attn_q", "IQ4_NL"),
                             ("mlp.gate_proj", "ffn_gate", "IQ4_NL"),
                             ("mlp.down_proj", "ffn_down", "IQ4_XS")):
            qtype, values = tensors[f"blk.{i}.{gg}.weight"]
            w = loaded.model.get_submodule(f"model.layers.{i}.{hf}").weight.detach()
            n_head = heads.get(gg, 0)
            assert qtype == want
            assert torch.equal(values, permute_qk(w, n_head) if n_head else w)
    assert_llama_cpp_agrees(out, loaded, tensors)
