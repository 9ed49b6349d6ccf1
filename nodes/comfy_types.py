"""The pack's own ComfyUI socket types. One prefix, DREAMRELATION_, so that our links cannot be
connected to another pack's sockets of the same name. (Links in saved workflows carry these names.)"""

from __future__ import annotations

from comfy_api.latest import io

# dreamrelation_core.data.dataset.DatasetSpec: a checked dataset folder
Dataset = io.Custom("DREAMRELATION_DATASET")
# nodes.train.PreparedDataset: an encoded dataset cache
Prepared = io.Custom("DREAMRELATION_PREPARED")
# nodes.sampler.AttentionRecorder, or None when no words are recorded
Attention = io.Custom("DREAMRELATION_ATTENTION")
