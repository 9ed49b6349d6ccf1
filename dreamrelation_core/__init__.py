"""DreamRelation core: relation LoRA triplet training on Mochi 1 (diffusers + peft).

Plain Python, no ComfyUI import anywhere in this package.
"""

__version__ = "0.1.0"
