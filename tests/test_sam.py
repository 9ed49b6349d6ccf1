"""SAM 1 and SAM 2 from local checkpoints: shape-inferred configs, box prompts, propagation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core.masks.grounding_dino import ModelFileError
from dreamrelation_core.masks.sam import (
    load_sam1,
    load_sam2,
    sam1_config_from_state_dict,
    sam2_config_name_from_state_dict,
    sam2_config_path,
)
from fixtures.mask_models import tiny_sam2_overrides, two_subject_clip, write_original_gdino, write_sam, write_sam2

BOXES = np.array([[8, 16, 28, 52], [64, 12, 86, 56]], np.float32)


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    return write_sam(tmp_path_factory.mktemp("sams") / "sam_vit_b_01ec64.pth")


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory) -> Path:
    path = write_sam2(tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt")
    # The tiny model is no shipped variant: its config goes beside it, as users may do too.
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(sam2_config_path("sam2.1_hiera_t"))
    for k, v in tiny_sam2_overrides().items():
        OmegaConf.update(cfg, f"model.{k}", v, merge=True)
    OmegaConf.save(cfg, str(path) + ".yaml")
    return path


def test_sam1_config_is_read_from_shapes(sam_file: Path) -> None:
    sd = torch.load(sam_file, weights_only=True)
    cfg = sam1_config_from_state_dict(sd)
    assert cfg["embed_dim"] == 32 and cfg["depth"] == 2 and cfg["num_heads"] == 2
    assert cfg["global_attn_indexes"] == (1,) and cfg["window_size"] == 4 and cfg["image_size"] == 128
    seg = load_sam1(sam_file)
    for k, v in seg.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_sam1_boxes_reach_the_decoder(sam_file: Path) -> None:
    seg = load_sam1(sam_file)
    clip = two_subject_clip(3)
    emb, input_size = seg.embed(clip)
    assert emb.shape[0] == 3 and input_size == (128 * 64 // 96, 128)
    seen = []
    seg.model.prompt_encoder.register_forward_hook(lambda m, a, kw, o: seen.append(kw["boxes"].clone()), with_kwargs=True)
    masks, scores = seg.decode(emb[0], BOXES, input_size, (64, 96))
    assert masks.shape == (2, 64, 96) and masks.dtype == bool and scores.shape == (2,)
    # Boxes arrive scaled from the 64x96 frame to the encoder's 85x128 input.
    assert torch.allclose(seen[0], torch.from_numpy(BOXES) * torch.tensor([128 / 96, 85 / 64] * 2))
    assert not np.array_equal(masks[0], masks[1])  # two boxes, two different masks
    # Batching the embedding does not change it.
    single, _ = seg.embed(clip[1:2])
    assert torch.allclose(single[0], emb[1], atol=1e-4)


def test_sam_checkpoints_of_the_wrong_kind(tmp_path: Path, sam2_file: Path) -> None:
    with pytest.raises(ModelFileError, match="looks like a SAM 2 checkpoint"):
        load_sam1(sam2_file)
    _, gd = write_original_gdino(tmp_path / "g.pth", cfg_py=False)
    with pytest.raises(ModelFileError, match="looks like a Grounding DINO checkpoint"):
        load_sam1(gd)
    with pytest.raises(ModelFileError) as e:
        load_sam1(tmp_path / "sam_vit_h_4b8939.pth")
    assert str(tmp_path) in str(e.value) and "sam_vit_b_01ec64.pth" in str(e.value)
    with pytest.raises(ModelFileError, match="sam2.1_hiera_large.pt"):
        load_sam2(tmp_path / "nothing.pt")
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "pickle.pth").write_bytes((tmp_path / "x.npy").read_bytes())
    with pytest.raises(ModelFileError, match="not a readable weights-only checkpoint"):
        load_sam1(tmp_path / "pickle.pth")


def test_sam2_variant_from_state_dict() -> None:
    def fake(dim: int, blocks: int, v21: bool) -> dict:
        sd = {"image_encoder.trunk.patch_embed.proj.weight": torch.empty(dim, 3, 7, 7)}
        sd.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.empty(1) for i in range(blocks)})
        if v21:
            sd["no_obj_embed_spatial"] = torch.empty(1, 64)
        return sd

    assert sam2_config_name_from_state_dict(fake(144, 48, True)) == "sam2.1_hiera_l"
    assert sam2_config_name_from_state_dict(fake(96, 16, False)) == "sam2_hiera_s"
    assert sam2_config_path("sam2_hiera_b+").is_file()
    with pytest.raises(ModelFileError, match="width 8 with 5 blocks"):
        sam2_config_name_from_state_dict(fake(8, 5, True))


def test_sam2_loads_pt_and_safetensors(sam2_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    prop = load_sam2(sam2_file)
    sd = torch.load(sam2_file, weights_only=True)["model"]
    st = tmp_path / "sam2.1_hiera_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    (tmp_path / "sam2.1_hiera_tiny.yaml").write_text(Path(str(sam2_file) + ".yaml").read_text())
    prop2 = load_sam2(st)
    for k, v in prop2.predictor.state_dict().items():
        assert torch.equal(v, prop.predictor.state_dict()[k]), k


def test_sam2_propagates_over_every_frame_from_the_prompted_frame(sam2_file: Path) -> None:
    prop = load_sam2(sam2_file)
    calls = []
    real_add = prop.predictor.add_new_points_or_box

    def spy(state, **kw):
        calls.append(kw)
        return real_add(state, **kw)

    prop.predictor.add_new_points_or_box = spy
    clip = two_subject_clip(5)
    order = []
    masks = prop.propagate(clip, 2, BOXES, on_frame=order.append)
    assert masks.shape == (5, 2, 64, 96) and masks.dtype == bool
    assert order == [2, 3, 4, 1, 0]  # forward from the prompt, then backward, every frame once
    assert [c["obj_id"] for c in calls] == [1, 2] and all(c["frame_idx"] == 2 for c in calls)
    assert np.array_equal(calls[1]["box"], BOXES[1])
    with pytest.raises(ValueError, match="start frame 5 outside the clip's 5 frames"):
        prop.propagate(clip, 5, BOXES)


def test_missing_sam2_package_says_how_to_install(monkeypatch):
    import sys

    from dreamrelation_core.errors import MissingPackageError
    from dreamrelation_core.masks import sam as sam_mod

    monkeypatch.setitem(sys.modules, "sam2", None)  # import sam2 -> ImportError, as where it is not installed
    with pytest.raises(MissingPackageError, match="SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2"):
        sam_mod.build_sam2_model("sam2.1_hiera_t")
