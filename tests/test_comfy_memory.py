"""ComfyUI's models leave the GPU before training / the video pass, in every VRAM mode, or the node
refuses naming the mode; Prepare encodes text first, then frees T5, then encodes video.

On the CPU the GPU is played by the "meta" device: under --highvram / --gpu-only ComfyUI's offload
device *is* the GPU, so its plain unload moves a model there; the node's unload must move it to
the CPU instead. Everything else is ComfyUI's real model management.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamrelation_core.data.cache import Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset

META = torch.device("meta")


@pytest.fixture
def loaded_model(pack):
    """A real ModelPatcher loaded by ComfyUI (in current_loaded_models), its offload device the 'GPU'."""
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(8, 8), load_device=torch.device("cpu"),
                                               offload_device=META)
    mm.load_models_gpu([patcher])
    assert any(m.model is patcher for m in mm.current_loaded_models)
    yield patcher
    mm.unload_all_models()


@pytest.mark.parametrize("mode", ["--highvram", "--gpu-only"])
def test_models_leave_the_gpu_in_high_vram_modes(pack, loaded_model, monkeypatch, mode):
    import comfy.model_management as mm
    from comfy.cli_args import args

    train = pack.nodes.train
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)
    monkeypatch.setattr(args, "gpu_only", mode == "--gpu-only")
    weight = loaded_model.model.weight.detach().clone()
    line = train.release_comfy_models()
    assert loaded_model.model.weight.device.type == "cpu"  # not the offload 'GPU'
    assert torch.equal(loaded_model.model.weight.detach(), weight)
    assert loaded_model.offload_device == META  # ComfyUI's own setting is put back for its next use
    assert not any(m.model is loaded_model for m in mm.current_loaded_models)
    assert f"1 moved to the CPU despite {mode}" in line

    # Memory that stays held (models the mode put on the GPU untracked): refused, the mode named.
    monkeypatch.setattr(train, "_held_bytes", lambda device: 3 << 30)
    with pytest.raises(Exception) as e:
        train.release_comfy_models()
    assert type(e.value).__name__ == "TrainingError"
    assert f"runs with {mode} and still holds 3.0 GiB" in str(e.value)
    assert f"Restart ComfyUI without {mode}" in str(e.value)


def test_normal_mode_unloads_as_comfyui_does_and_never_refuses(pack, loaded_model, monkeypatch):
    import comfy.model_management as mm
    from comfy.cli_args import args

    train = pack.nodes.train
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(args, "gpu_only", False)
    monkeypatch.setattr(train, "_held_bytes", lambda device: 3 << 30)  # someone else's: not ours to refuse
    loaded_model.offload_device = torch.device("cpu")
    assert "holds 3.00 GiB" in train.release_comfy_models()
    assert not any(m.model is loaded_model for m in mm.current_loaded_models)


def test_encoding_settings_default_to_bf16_tiled_on_a_gpu_only(pack):
    settings = pack.nodes.train.encoding_settings
    assert settings(torch.device("cuda")) == (torch.bfloat16, True)
    assert settings(torch.device("cpu")) == (torch.float32, False)  # bf16 convolutions are slow on CPUs
    assert settings(torch.device("cpu"), "bf16", "on") == (torch.bfloat16, True)
    assert settings(torch.device("cuda"), "fp32", "off") == (torch.float32, False)


def test_prepare_encodes_all_text_then_frees_the_text_encoder_then_encodes_video(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_videos=2, num_frames=7, size=(32, 32))
    calls: list[str] = []

    def video(frames: np.ndarray):
        calls.append("video")
        return torch.zeros(12, 2, 4, 4), torch.zeros(12, 2, 4, 4)

    def text(captions: list[str], n: int):
        calls.append("text")
        return torch.ones(1, n, 8), torch.ones(1, n, dtype=torch.bool)

    encoders = Encoders(video, text, ("v", "t"), after_text=lambda: calls.append("free text encoder"))
    prepare_dataset(data, tmp_path / "cache", encoders, 7, (32, 32), 16)
    assert calls == ["text", "text", "free text encoder", "video", "video"]
    assert [c.y_feat.shape for c in load_prepared(tmp_path / "cache")] == [(16, 8), (16, 8)]
    calls.clear()  # up to date: nothing encoded, nothing freed
    prepare_dataset(data, tmp_path / "cache", encoders, 7, (32, 32), 16)
    assert calls == []
