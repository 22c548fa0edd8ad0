"""`zeropoint analyze`: a language model reads --text, a .pt module --inputs; the other is an
error, not silently ignored."""

import torch

from zeropoint.cli import main


def test_inputs_for_a_language_model_is_an_error(tiny_checkpoint, tmp_path, capsys):
    torch.save(torch.randn(8, 64), tmp_path / "x.pt")
    assert main(["analyze", str(tiny_checkpoint), "--inputs", str(tmp_path / "x.pt"),
                 "--plot", "none"]) == 2
    assert "--inputs feeds a .pt module" in capsys.readouterr().err


def test_text_for_a_module_is_an_error(tmp_path, capsys):
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "m.pt")
    (tmp_path / "t.txt").write_text("some text")
    assert main(["analyze", str(tmp_path / "m.pt"), "--text", str(tmp_path / "t.txt"),
                 "--plot", "none"]) == 2
    assert "--text is for language models" in capsys.readouterr().err


def test_a_zeropoint_directory_is_refused_before_loading(tmp_path, capsys):
    from zeropoint.modeldir.format import MANIFEST

    (tmp_path / MANIFEST).write_text("{}")  # a broken manifest: loading it would fail otherwise
    assert main(["analyze", str(tmp_path), "--plot", "none"]) == 2
    assert "is a zeropoint directory (already quantized" in capsys.readouterr().err
