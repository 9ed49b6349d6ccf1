"""Test-only ComfyUI custom nodes: tiny Mochi and Wan loaders for the test server (never shipped).

Each node is a stock ComfyUI loader (UNETLoader, CLIPLoader, VAELoader) with the same inputs and
output type, but building ComfyUI's own Mochi / Wan classes at the size of the file's weights
(see `tiny.py`; a Wan DiT goes through ComfyUI's stock loading function unchanged). A test swaps `class_type` in an API prompt made from a shipped workflow; every other
node -- sampler, VAE decode, the pack's nodes -- is ComfyUI's and the pack's own code.

The server must run under `python -O` (ComfyUI asserts Mochi's full feed-forward width).
"""

from __future__ import annotations


def _stock(name: str):
    import nodes  # ComfyUI's nodes.py, inside the server

    return nodes.NODE_CLASS_MAPPINGS[name]


def _read(folder: str, name: str):
    import comfy.utils
    import folder_paths

    path = folder_paths.get_full_path_or_raise(folder, name)
    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    return path, sd, metadata


class TinyMochiUNETLoader:
    """UNETLoader for Mochi DiT files of any size (Wan DiT files: ComfyUI's own loading function)."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "testing/tiny"

    @classmethod
    def INPUT_TYPES(cls):
        return _stock("UNETLoader").INPUT_TYPES()

    def load_unet(self, unet_name: str, weight_dtype: str = "default"):
        import torch

        from .tiny import is_wan_dit, load_tiny_mochi

        dtype = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}.get(weight_dtype)
        path, sd, _ = _read("diffusion_models", unet_name)
        if is_wan_dit(sd):  # ComfyUI reads a Wan's sizes from its shapes: the stock path, as UNETLoader
            import comfy.sd

            return (comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype} if dtype else {}),)
        return (load_tiny_mochi(sd, dtype, what=path),)


class TinyMochiCLIPLoader:
    """CLIPLoader for T5 (type 'mochi') and umT5 (type 'wan') encoder files of any size."""

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "testing/tiny"

    @classmethod
    def INPUT_TYPES(cls):
        return _stock("CLIPLoader").INPUT_TYPES()

    def load_clip(self, clip_name: str, type: str = "mochi", device: str = "default"):
        import folder_paths
        import torch

        from .tiny import load_tiny_mochi_clip, load_tiny_wan_clip

        if type not in ("mochi", "wan"):
            raise ValueError(f"the tiny CLIP loader builds Mochi's T5 and Wan's umT5 only, got type {type!r}")
        options = {}
        if device == "cpu":
            options["load_device"] = options["offload_device"] = torch.device("cpu")
        path, sd, _ = _read("text_encoders", clip_name)
        load = load_tiny_wan_clip if type == "wan" else load_tiny_mochi_clip
        return (load(sd, folder_paths.get_folder_paths("embeddings"), options, what=path),)


class TinyMochiVAELoader:
    """VAELoader for the tiny Mochi and Wan 2.1 VAEs' files."""

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "testing/tiny"

    @classmethod
    def INPUT_TYPES(cls):
        return _stock("VAELoader").INPUT_TYPES()

    def load_vae(self, vae_name: str):
        from .tiny import is_wan_vae, load_tiny_mochi_vae, load_tiny_wan_vae

        path, sd, metadata = _read("vae", vae_name)
        load = load_tiny_wan_vae if is_wan_vae(sd) else load_tiny_mochi_vae
        return (load(sd, metadata, what=path),)


NODE_CLASS_MAPPINGS = {
    "TinyMochiUNETLoader": TinyMochiUNETLoader,
    "TinyMochiCLIPLoader": TinyMochiCLIPLoader,
    "TinyMochiVAELoader": TinyMochiVAELoader,
}
# stock loader -> its tiny stand-in (same inputs, same output type)
REPLACES = {"UNETLoader": "TinyMochiUNETLoader", "CLIPLoader": "TinyMochiCLIPLoader", "VAELoader": "TinyMochiVAELoader"}

