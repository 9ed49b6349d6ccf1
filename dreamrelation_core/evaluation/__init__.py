"""Offline evaluation of generated relation videos (the paper's metrics, from local model files).

- `clip_metrics`: CLIP-T and temporal consistency with a local CLIP (Hugging Face folder or a
  ComfyUI clip_vision file);
- `fvd`: Fréchet Video Distance with a local I3D-style network (TorchScript or a small 3D CNN);
- `judge`: relation accuracy, a local vision-language model answering yes/no;
- `leakage`: CLIP similarity of generated frames to the training exemplars;
- `runner`: a folder of videos + a prompts file -> CSV rows and a summary (the `evaluate` command).

Imports only `data` (video reading) and the base modules below it.
"""
