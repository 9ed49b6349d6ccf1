"""What the rest of the core needs to know about a base model: one small spec object per model.

`mochi/spec.py` and `wan/spec.py` implement `BaseModelSpec`; `base_models.py` (a floor above
both) picks one by name or detects it from a file. Everything outside a base model's own package
asks its spec: the latent format (channels, compression, the frame-count rule, normalisation),
the time convention and the model call (`predict`), the blocks that swap and checkpointing walk,
where the relation LoRA triplet sits (`adapter_modules`: the one place that says so; an adapter
placement and, for ablations, a relation placement pick it), and how its files are recognised.

Time convention shared by every spec: sigma in [0, 1], x_sigma = (1 - sigma) * z + sigma * eps,
and `predict` returns u = z - eps (docs/method.md "Time and latent conventions"); each spec
translates to its model's own timestep.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch


def nearest_causal_frame_counts(num_frames: int, step: int) -> tuple[int, int]:
    """The two valid clip lengths (step * k + 1, k >= 1) closest to `num_frames`, smaller first: the
    frame rule of a VAE that encodes frame 0 alone, then groups of `step` frames (Mochi 6, Wan 4)."""
    smallest = 1 + step
    if num_frames <= smallest:
        return smallest, smallest + step
    below = 1 + ((num_frames - 1) // step) * step
    if below == num_frames:  # already valid: its neighbours below and above
        return below - step if below > smallest else below, below + step
    return below, below + step


def check_causal_frame_count(num_frames: int, step: int, what: str) -> None:
    """Raise ValueError unless num_frames = step * k + 1 with k >= 1; `what` names the model and
    its rule in the message ("Mochi needs 6k + 1 frames with k >= 1 (7, 13, ..., 61, ..., 85)")."""
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool):
        raise ValueError(f"frame count must be an integer, got {num_frames!r}")
    if num_frames >= 1 + step and (num_frames - 1) % step == 0:
        return
    lo, hi = nearest_causal_frame_counts(int(num_frames), step)
    raise ValueError(f"{num_frames} frames: {what}; the nearest valid lengths are {lo} and {hi}")


def model_class_name(model: Any) -> str:
    """The name of the class the model was built as. FSDP2 (a base sharded over processes) swaps in
    a subclass named `FSDP<name>` defined by torch; the first class not defined by torch is the model's."""
    return next((c.__name__ for c in type(model).__mro__ if not c.__module__.startswith("torch.")),
                type(model).__name__)


class BaseModelSpec:
    """One base model family as the core sees it. Subclasses set the class attributes and
    implement the methods that raise NotImplementedError."""

    name: str = ""  # stored in LoRA files' metadata (`base_model`)
    family: str = ""  # "mochi", "wan"
    display_name: str = ""  # in messages: "Mochi", "Wan 2.1"
    frame_rule: str = ""  # in messages: "6k + 1 frames (7, 13, ..., 61, ...)"
    # latent format
    latent_channels: int = 0
    spatial_compression: int = 8  # VAE, per side
    temporal_compression: int = 1  # VAE: frame 0 alone, then groups of this many frames
    patch_size: int = 2  # the transformer's spatial patches on the latent grid
    text_len: int = 256  # text tokens the transformer is trained with
    # the transformer's block list (attribute of the diffusers model) and its module names
    blocks_attr: str = "transformer_blocks"
    diffusers_class: str = ""
    adapter_modules: Mapping[str, tuple[str, ...]] = {}  # adapter -> submodules (of the placement)
    keep_precision: tuple[str, ...] = ()  # module paths whose Linears are never stored in fp8
    placement: str = "default"  # which adapter placement adapter_modules is
    placements: tuple[str, ...] = ("default",)
    # the relation adapter's modules within the placement: `relation_placement` names which of
    # `relation_placements` adapter_modules["relation"] is (the method's; others are ablations,
    # docs/ablation.md). Empty: the model knows only its default.
    relation_placement: str = "qk"
    relation_placements: Mapping[str, tuple[str, ...]] = {}
    module_re: re.Pattern = re.compile(r"^$")

    # -- frames and sizes --------------------------------------------------------------------
    @property
    def min_frames(self) -> int:
        """At least two latent frames: a relation is a motion."""
        return 1 + self.temporal_compression

    @property
    def size_multiple(self) -> int:
        return self.spatial_compression * self.patch_size

    def check_frame_count(self, num_frames: int) -> None:
        raise NotImplementedError

    def latent_frame_count(self, num_frames: int) -> int:
        self.check_frame_count(num_frames)
        return 1 + (num_frames - 1) // self.temporal_compression

    def nearest_valid_frame_counts(self, num_frames: int) -> tuple[int, int]:
        raise NotImplementedError

    def check_training_size(self, size: tuple[int, int]) -> None:
        raise NotImplementedError

    def latent_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Latent grid (h, w) of a frame size (H, W)."""
        return size[0] // self.spatial_compression, size[1] // self.spatial_compression

    # -- latent values and time ----------------------------------------------------------------
    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the latent space ComfyUI samples in."""
        raise NotImplementedError

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Noise level sigma [B] -> the `timestep` the diffusers transformer takes."""
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
        """u = z - eps predicted at x_sigma = `latents` [B, C, T, h, w]; text [B, L, D], text_mask [B, L] bool,
        sigma [B] on the model's device."""
        raise NotImplementedError

    def block_inputs(self, model: torch.nn.Module, device: torch.device) -> tuple[tuple, dict]:
        """(args, kwargs) for one transformer block at a few tokens on `device`: what the memory
        warm-up runs a copy of block 0 with (training.memory.warmup)."""
        raise NotImplementedError

    # -- blocks and LoRA placement -------------------------------------------------------------
    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The transformer blocks (what block swap streams and checkpointing wraps)."""
        return getattr(model, self.blocks_attr)

    def with_placement(self, placement: str) -> BaseModelSpec:
        """This spec with another adapter placement (ValueError naming the known ones)."""
        if placement not in self.placements:
            raise ValueError(f"{self.name}: adapter placement {placement!r} is not known; choose one of {self.placements}")
        return self

    def with_relation_placement(self, name: str) -> BaseModelSpec:
        """This spec with the relation adapter on another module set (`relation_placements`; the
        other adapters stay); ValueError naming the known ones."""
        if name == self.relation_placement:
            return self
        if name not in self.relation_placements:
            known = tuple(self.relation_placements) or (self.relation_placement,)
            raise ValueError(f"{self.name}: relation placement {name!r} is not known; choose one of {known}")
        out = copy.copy(self)
        out.adapter_modules = {**self.adapter_modules, "relation": tuple(self.relation_placements[name])}
        out.relation_placement = name
        return out

    def relation_placement_of(self, paths: Iterable[str]) -> str | None:
        """Which relation placement a relation adapter on these module paths is (None: none): the
        one whose target modules, in a model as deep as the paths reach, are on the same submodules."""
        parsed = [self.parse_module_path(p) for p in paths]
        if not parsed:
            return None
        n, subs = 1 + max(i for i, _ in parsed), {sub for _, sub in parsed}
        for name in dict.fromkeys((self.relation_placement, *self.relation_placements)):
            placed = self.with_relation_placement(name)
            if {placed.parse_module_path(p)[1] for p in placed.target_modules("relation", n)} == subs:
                return name
        return None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def _identity(self) -> tuple:
        return self.name, self.placement, self.relation_placement

    def is_model(self, model: Any) -> bool:
        return model_class_name(model) == self.diffusers_class

    def num_blocks(self, model: torch.nn.Module) -> int:
        return len(self.blocks(model))

    def module_path(self, block: int, sub: str) -> str:
        raise NotImplementedError

    def parse_module_path(self, path: str) -> tuple[int, str]:
        """A module path of an adapter target -> (block, sub); ValueError for anything else."""
        m = self.module_re.match(path)
        if m is None:
            raise ValueError(f"not a {self.name} LoRA target module path: {path!r}")
        return int(m.group(1)), m.group(2)

    def target_modules(self, adapter: str, num_layers: int) -> list[str]:
        """Module paths an adapter is trained on in a model with `num_layers` blocks."""
        return [self.module_path(i, sub) for i in range(num_layers) for sub in self.adapter_modules[adapter]]

    # -- files -----------------------------------------------------------------------------------
    def detect(self, keys: list[str]) -> bool:
        """Whether a transformer file with these keys is this base model."""
        raise NotImplementedError

    def variant_of_file(self, path) -> BaseModelSpec:
        """The exact spec of a file `detect` said is this family (e.g. which VAE's latents)."""
        return self

    def load_transformer(self, source: str, config_dir: str = "", dtype: torch.dtype = torch.float32, seed: int = 0,
                         tiny: dict | None = None, linear_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The frozen transformer from local files ("tiny": the random test model). `linear_dtype`
        fp8: the Linear weights may be quantised while the file is read, so that a bf16 file never
        sits in memory whole (a loader that cannot leaves it to `fp8.freeze_linears` later)."""
        raise NotImplementedError

    def load_vae(self, path, config_dir=None, dtype: torch.dtype = torch.float32, device="cpu") -> torch.nn.Module:
        """The frozen VAE (a diffusers model with `encode(x).latent_dist` and `decode(z).sample`)."""
        raise NotImplementedError

    def load_text_encoder(self, path, tokenizer_dir=None, config_dir=None, dtype: torch.dtype = torch.float32,
                          device="cpu") -> tuple:
        """(text encoder, tokenizer) from local files."""
        raise NotImplementedError

    def vae_from_comfy_state_dict(self, state_dict: dict, dtype: torch.dtype = torch.float32,
                                  source: str = "state dict") -> torch.nn.Module:
        """The diffusers VAE from the weights of a VAE ComfyUI has loaded (its `first_stage_model`)."""
        raise NotImplementedError

    def tiny_encoders(self, seed: int = 0, text_len: int = 16) -> tuple:
        """(VAE, text encoder, tokenizer): the random tiny models of the demo and the tests."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<base model {self.name}>"
