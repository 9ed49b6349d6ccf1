"""Command line: every command has --help; the file commands work and fail cleanly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamrelation_core.cli import main
from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.mochi.tiny import tiny_transformer

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare", "train", "resume", "export-relation", "import-reference", "demo"]


def test_help_lists_and_each_command_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out
    for c in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([c, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "dreamrelation_core", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "export-relation" in r.stdout


def test_one_progress_bar_for_every_long_command(capsys):
    """prepare / analyze call it (done, total, name), masks (done, total), evaluate once per message."""
    from dreamrelation_core.cli.progress import progress_bar, say

    bar, update = progress_bar("prepare", "video", total=3)
    update(2, 3, "clip_b")
    assert (bar.n, bar.total) == (2, 3) and "clip_b" in str(bar)
    update(label="FVD: 4")  # no count: one step on
    assert bar.n == 3 and "FVD: 4" in str(bar)
    update(5, 10)  # the work learned its length late (mask extraction)
    assert (bar.n, bar.total) == (5, 10)
    say("a note above the bar")
    bar.close()
    assert "a note above the bar" in capsys.readouterr().out
    quiet, update = progress_bar("evaluate", "step", quiet=True)
    update(label="CLIP: a.mp4")
    quiet.close()
    assert capsys.readouterr().err == ""
    cli = ROOT / "dreamrelation_core" / "cli"
    own_bars = [p.name for p in sorted(cli.glob("*.py"))
                if p.name != "progress.py" and re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M)]
    assert not own_bars, f"{own_bars}: use cli/progress.py's bar"


@pytest.fixture()
def triplet_file(tmp_path):
    model = triplet.add_triplet(tiny_transformer(num_layers=2), rank=4, alpha=4.0)
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model):
            p.normal_()
    return formats.save_triplet(tmp_path / "t.safetensors", triplet.to_lora_set(model), step=3)


def test_export_relation(tmp_path, triplet_file, capsys):
    out = tmp_path / "rel.safetensors"
    assert main(["export-relation", str(triplet_file), str(out)]) == 0
    lora = formats.load_lora_file(out)
    assert set(lora.adapters) == {"relation", "ffn"} and lora.metadata["step"] == "3"
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_a_clean_error_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    out = tmp_path / "out.safetensors"
    assert main(["export-relation", str(bad), str(out)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "bad.safetensors" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["import-reference", str(tmp_path / "missing.lora.pt"), str(out)]) == 1
    assert not out.exists()


def test_train_from_yaml_then_resume(tmp_path, capsys):
    from dreamrelation_core.data.cache import Encoders, prepare_dataset
    from dreamrelation_core.data.synthetic import write_synthetic_dataset
    from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
    from dreamrelation_core.training.config import TrainConfig

    data = write_synthetic_dataset(tmp_path / "data", num_videos=1, num_frames=7, size=(32, 32))
    prepare_dataset(data, tmp_path / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32), max_text_len=16)
    cfg = TrainConfig(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"), num_steps=4,
                      warmup_steps=1, checkpoint_every=2, rank=2, alpha=2.0, device="cpu")
    path = cfg.save_yaml(tmp_path / "cfg.yaml")
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "run" / "relation_only.safetensors").exists()
    assert main(["train", str(path)]) == 1  # refuses to overwrite a run silently
    assert "resume" in capsys.readouterr().err
    # a resumed run continues to the stored config's num_steps: 4 -> done
    assert main(["resume", str(tmp_path / "run")]) == 0
    assert "at step 4" in capsys.readouterr().out
