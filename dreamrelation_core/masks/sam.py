"""SAM (segment-anything 1.0) and SAM 2 (sam2 1.1) from local checkpoints.

SAM: box prompts -> masks, frame by frame. The image embedding is the expensive part, so frames
are embedded in batches and both subjects' boxes are decoded against one embedding. The model's
sizes (ViT-B/L/H or smaller) are read from the checkpoint's tensor shapes, so any file name works.
segment-anything's own builders call `torch.load` without `weights_only`; they are not used.

SAM 2: the video predictor propagates the two subjects' masks from one prompted frame through
the clip (forward, then backward when the prompt is not on frame 0). Frames come from memory
(sam2's own `init_state` only reads files). The model variant is read from the checkpoint
(`.pt` with a `model` dict, or an original-key `.safetensors`); a `<checkpoint>.yaml` beside it
overrides that. Without sam2's compiled `_C` extension (CPU installs) sam2 warns and skips hole
filling; masks are otherwise the same.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MissingPackageError, ModelFileError, ModelFileNotFoundError
from ..statedict import indices, read_state_dict
from .images import check_uint8_frames, imagenet_normalize

log = logging.getLogger("dreamrelation.masks")

SAM1_FILES = ("sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth")
SAM2_FILES = (
    "sam2.1_hiera_large.pt", "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_small.pt", "sam2.1_hiera_tiny.pt",
    "sam2_hiera_large.pt", "sam2_hiera_base_plus.pt", "sam2_hiera_small.pt", "sam2_hiera_tiny.pt",
)


# ---------------------------------------------------------------------------------------------
# SAM 1


def build_sam1(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    window_size: int = 14,
    image_size: int = 1024,
    prompt_embed_dim: int = 256,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    decoder_depth: int = 2,
    iou_head_hidden_dim: int = 256,
    mlp_ratio: float = 4.0,
):
    """segment-anything's `Sam` with the given sizes (defaults: ViT-B), random weights, eval mode."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    patch = 16
    grid = image_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(global_attn_indexes),
            window_size=window_size, out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_embed_dim,
                                          mlp_dim=decoder_mlp_dim, num_heads=decoder_heads),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def sam1_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """`build_sam1` keyword arguments matching a checkpoint's tensor shapes."""
    embed_dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
    grid = sd["image_encoder.pos_embed"].shape[1]
    depth = len(indices(sd, "image_encoder.blocks."))
    rel = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    # Global-attention blocks see the whole grid (2*grid-1 relative positions), the others a window.
    global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
    windowed = [r for r in rel if r.shape[0] != 2 * grid - 1]
    window = (windowed[0].shape[0] + 1) // 2 if windowed else 0
    prompt_dim = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // rel[0].shape[1],
        global_attn_indexes=global_idx,
        window_size=window,
        image_size=grid * 16,
        prompt_embed_dim=prompt_dim,
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        decoder_depth=len(indices(sd, "mask_decoder.transformer.layers.")),
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
    )


def _what_is_it(sd: dict) -> str:
    sd = {k.removeprefix("module."): None for k in sd}
    if any(k.startswith("sam_mask_decoder.") or k.startswith("memory_attention.") for k in sd):
        return "it looks like a SAM 2 checkpoint (put it in models/sam2/ and choose it as the SAM 2 model)"
    if "transformer.level_embed" in sd or any(k.startswith("backbone.0.") for k in sd):
        return "it looks like a Grounding DINO checkpoint"
    if any(k.startswith("image_encoder.") for k in sd):
        return "it has image_encoder keys but not SAM's layout"
    return f"found keys like {', '.join(list(sd)[:4])}"


def load_sam1(path: str | os.PathLike, device: str | torch.device = "cpu") -> SamSegmenter:
    """A SamSegmenter from sam_vit_{h,l,b}_*.pth (or any checkpoint in SAM's key layout)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"SAM checkpoint {path} not found; put one of {', '.join(SAM1_FILES)} in {path.parent}")
    sd = read_state_dict(path)
    if "image_encoder.patch_embed.proj.weight" not in sd or "mask_decoder.transformer.layers.0.mlp.lin1.weight" not in sd:
        raise ModelFileError(f"{path}: not a SAM (segment-anything) checkpoint: {_what_is_it(sd)}")
    model = build_sam1(**sam1_config_from_state_dict(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"{path}: SAM weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return SamSegmenter(model.to(device))


class SamSegmenter:
    """Box prompts -> masks with SAM 1; embeddings are computed once per frame, in batches."""

    def __init__(self, model) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model.eval()
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> SamSegmenter:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def embed(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 [N,H,W,3] -> (image embeddings [N,C,h,w], the resized input size before padding)."""
        check_uint8_frames(frames)
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float()
        # Longest side -> encoder size, values stay 0..255. (segment-anything's apply_image_torch
        # takes the target size from the batch and channel dims, so it is not used.)
        size = self.transform.get_preprocess_shape(x.shape[-2], x.shape[-1], self.transform.target_length)
        x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
        input_size = (int(size[0]), int(size[1]))
        x = self.model.preprocess(x)  # normalise + pad to square
        return self.model.image_encoder(x), input_size

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, boxes: np.ndarray, input_size: tuple[int, int],
               original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """One frame's embedding [C,h,w] + boxes [B,4] (xyxy, original pixels) -> (masks [B,H,W] bool, scores [B])."""
        b = torch.as_tensor(np.asarray(boxes, np.float32), device=self.device).reshape(-1, 4)
        b = self.transform.apply_boxes_torch(b, original_size)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=b, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=embedding[None],
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,  # a box is unambiguous enough; one mask per subject
        )
        masks = self.model.postprocess_masks(low_res, input_size, original_size)
        return (masks[:, 0] > self.model.mask_threshold).cpu().numpy(), iou[:, 0].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# SAM 2

_SAM2_VARIANTS = {  # (trunk embed dim, number of trunk blocks) -> config file stem
    (96, 12): "hiera_t",
    (96, 16): "hiera_s",
    (112, 24): "hiera_b+",
    (144, 48): "hiera_l",
}


SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2"


def _require_sam2():
    """The optional sam2 package, or an error that says how to install it."""
    try:
        import hydra  # noqa: F401
        import sam2
    except ImportError as e:
        raise MissingPackageError(
            f"SAM 2 propagation needs the optional package sam2 ({e.name} is missing): install it into "
            f"ComfyUI's Python with `{SAM2_INSTALL}` (no compiler needed), or choose no SAM 2 model"
        ) from e
    return sam2


def sam2_config_path(name: str) -> Path:
    """A config shipped with sam2: 'sam2.1_hiera_t' -> .../sam2/configs/sam2.1/sam2.1_hiera_t.yaml."""
    sam2 = _require_sam2()

    folder = "sam2.1" if name.startswith("sam2.1") else "sam2"
    path = Path(sam2.__file__).parent / "configs" / folder / f"{name}.yaml"
    if not path.is_file():
        raise ModelFileError(f"sam2 ships no config {path.name} (looked in {path.parent})")
    return path


def sam2_config_name_from_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """Which shipped config fits a checkpoint: variant from trunk width and depth, 2 vs 2.1 from keys."""
    dim = sd["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    blocks = len(indices(sd, "image_encoder.trunk.blocks."))
    variant = _SAM2_VARIANTS.get((dim, blocks))
    if variant is None:
        raise ModelFileError(
            f"SAM 2 trunk of width {dim} with {blocks} blocks matches none of hiera t/s/b+/l; "
            "put its config beside it as <checkpoint>.yaml"
        )
    # SAM 2.1 added these parameters.
    v21 = "no_obj_embed_spatial" in sd or "obj_ptr_tpos_proj.weight" in sd
    return f"{'sam2.1' if v21 else 'sam2'}_{variant}"


def _sam2_has_c_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401

        return True
    except ImportError:
        return False


def build_sam2_model(config: str | os.PathLike, overrides: dict | None = None):
    """SAM2VideoPredictor from a shipped config name or a yaml path, random weights, eval mode."""
    _require_sam2()  # optional: hydra-core and omegaconf come with sam2; the error says how to install it
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(config) if str(config).endswith(".yaml") else sam2_config_path(str(config))
    cfg = OmegaConf.load(path)
    if "model" not in cfg:
        raise ModelFileError(f"{path}: a SAM 2 config needs a top-level 'model' entry")
    # The video predictor with the post-processing sam2's own video builder switches on.
    extra = {
        "_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
        "sam_mask_decoder_extra_args": {
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
        "binarize_mask_from_pts_for_mem_enc": True,
        # hole filling needs the compiled extension; without it sam2 would warn on every frame
        "fill_hole_area": 8 if _sam2_has_c_extension() else 0,
    }
    for key, value in {**extra, **(overrides or {})}.items():
        OmegaConf.update(cfg, f"model.{key}", value, merge=True, force_add=True)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True).eval()


def load_sam2(path: str | os.PathLike, device: str | torch.device = "cpu") -> Sam2Propagator:
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"SAM 2 checkpoint {path} not found; put one of {', '.join(SAM2_FILES)} in {path.parent}")
    sd = read_state_dict(path)
    if "image_encoder.trunk.patch_embed.proj.weight" not in sd or not any(k.startswith("memory_attention.") for k in sd):
        raise ModelFileError(f"{path}: not a SAM 2 checkpoint (no image_encoder.trunk / memory_attention keys): {_what_is_it(sd)}")
    sidecar = next((p for p in (Path(str(path) + ".yaml"), path.with_suffix(".yaml")) if p.is_file()), None)
    model = build_sam2_model(sidecar or sam2_config_name_from_state_dict(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"{path}: SAM 2 weights do not fit its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return Sam2Propagator(model.to(device))


class _Frames:
    """Frames converted to SAM 2's input one at a time when sam2 asks (not the whole clip at once)."""

    def __init__(self, frames: np.ndarray, size: int, device: torch.device) -> None:
        self.frames, self.size, self.device = frames, size, device

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.frames[i])).to(self.device).permute(2, 0, 1).float() / 255.0
        # sam2 squashes every frame to a square of its image size (no aspect-preserving pad).
        x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)[0]
        return imagenet_normalize(x)


class Sam2Propagator:
    """Two box prompts on one frame -> both subjects' masks on every frame."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor.eval()

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def to(self, device: str | torch.device) -> Sam2Propagator:
        self.predictor.to(device)
        return self

    def init_state(self, frames: np.ndarray) -> dict:
        """The inference state sam2's `init_state` builds from a video file, from frames in memory.

        Keys as in sam2 1.1's SAM2VideoPredictor.init_state.
        """
        dev = self.device
        state: dict = {
            "images": _Frames(frames, self.predictor.image_size, dev),
            "num_frames": len(frames),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": int(frames.shape[1]),
            "video_width": int(frames.shape[2]),
            "device": dev,
            "storage_device": dev,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        return state

    @torch.inference_mode()
    def propagate(
        self,
        frames: np.ndarray,
        start_frame: int,
        boxes: np.ndarray,
        on_frame: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """bool masks [F, 2, H, W]; `boxes` [2,4] xyxy pixels on `start_frame`.

        `on_frame(frame_idx)` is called after each frame (progress / cancellation: it may raise).
        """
        check_uint8_frames(frames)
        n, h, w = frames.shape[:3]
        if not 0 <= start_frame < n:
            raise ValueError(f"start frame {start_frame} outside the clip's {n} frames")
        state = self.init_state(frames)
        p = self.predictor
        for obj, box in enumerate(np.asarray(boxes, np.float32).reshape(2, 4)):
            p.add_new_points_or_box(state, frame_idx=start_frame, obj_id=obj + 1, box=box)
        out = np.zeros((n, 2, h, w), bool)
        seen = np.zeros(n, bool)
        directions = [False] + ([True] if start_frame > 0 else [])
        for reverse in directions:
            for idx, obj_ids, masks in p.propagate_in_video(state, start_frame_idx=start_frame, reverse=reverse):
                m = (masks[:, 0] > 0.0).cpu().numpy()
                for k, obj in enumerate(obj_ids):
                    out[idx, obj - 1] = m[k]
                if not seen[idx]:
                    seen[idx] = True
                    if on_frame is not None:
                        on_frame(idx)
        return out
