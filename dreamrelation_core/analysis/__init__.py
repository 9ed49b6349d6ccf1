"""Q/K/V analysis (docs/method.md "Q/K/V analysis"; usage and choices in docs/analysis.md).

`subspace` (phi between weight matrices), `weights` (attention Q/K/V found by key pattern, read
slice by slice), `sweep` (every layer of a model file: JSON, CSV, heat map), `lora_report` (a
relation LoRA's norms and subspaces against the base), `features` (Q/K/V feature maps of one clip
at one denoising step), `plots`. Stands on the floor of training/masks: it may import mochi, lora
and data; only cli and the nodes import it.
"""
