"""The README's first command: the demo runs end to end and writes every promised file."""

from PIL import Image

from dreamrelation_core.cli.demo import run_demo
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.training.trainer import load_checkpoint


def test_demo_writes_everything(tmp_path, capsys):
    files = run_demo(tmp_path / "demo", steps=6, seed=0, sample_steps=2)
    out = capsys.readouterr().out
    for name, path in files.items():
        assert path.is_file() and str(path) in out, name  # printed where each file went
    assert load_checkpoint(files["checkpoint"])["step"] == 6
    assert set(load_lora_file(files["triplet"]).adapters) == {"relation", "subject1", "subject2", "ffn"}
    assert set(load_lora_file(files["relation_only"]).adapters) == {"relation", "ffn"}
    with Image.open(files["sample"]) as gif:
        assert gif.n_frames == 25 and gif.size == (64, 64)  # the clip length and size it trained on
    with Image.open(files["loss_curve"]) as png:
        assert png.size[0] > 500
