"""One error hierarchy for the whole library.

Every error the library raises on bad input is a `DreamRelationError`, and its message names the
file, key, shape or field at fault and what was expected. Each class also derives from the
built-in exception it used to be (ValueError, FileNotFoundError, RuntimeError, ImportError), so
callers that catch those keep working. The CLI and the nodes print these messages as they are,
without a traceback.
"""

from __future__ import annotations


class DreamRelationError(Exception):
    """Base of every error raised by dreamrelation_core on bad input or a failed run."""


class ModelFileError(DreamRelationError, ValueError):
    """A model file (DiT, VAE, T5, tokenizer, Grounding DINO, SAM) cannot be used as it is."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """A model file that is needed is not where it was looked for."""


class MissingPackageError(DreamRelationError, ImportError):
    """An optional Python package is needed for this feature; the message says how to install it."""


class KeyLayoutError(DreamRelationError, ValueError):
    """A state dict's keys or shapes do not match the layout a converter expects."""


class LoraFormatError(DreamRelationError, ValueError):
    """A LoRA file cannot be read, or does not fit the model it is meant for."""


class DatasetError(DreamRelationError, ValueError):
    """A training dataset (videos, captions, masks, cache) is incomplete or inconsistent."""


class VideoError(DatasetError):
    """A video file or frame folder cannot be read or does not fit the training clip."""


class MaskFormatError(DatasetError):
    """A subject-mask file or folder is unreadable or does not match its video."""


class MaskExtractionError(DreamRelationError, RuntimeError):
    """Subject masks could not be made (subjects not found, empty masks)."""


class TrainingError(DreamRelationError, RuntimeError):
    """A training run cannot start or cannot go on (non-finite loss, bad checkpoint, settings)."""


class RunLockedError(TrainingError):
    """Another training process holds the run folder (its lock names the holder)."""


class DiskFullError(DreamRelationError, OSError):
    """A file could not be written for lack of space; the message names the file, the bytes it
    needed and the space that was free. Nothing was half-written: the old file (if any) is intact."""


class HostMemoryError(TrainingError):
    """Host memory (RAM) ran out or cannot be page-locked: not a GPU out-of-memory, and its advice
    differs (swapping more blocks would need more RAM, not less)."""


class Cancelled(DreamRelationError):
    """The user cancelled a long operation (mask extraction, training)."""


class NotEnoughSubjectsError(MaskExtractionError):
    """No detection frame holds both subjects: nothing to start the two tracks from."""


# ---------------------------------------------------------------- evaluation


class EvaluationError(DreamRelationError, ValueError):
    """Evaluation inputs (generated videos, prompts file, reference set, features) are incomplete or
    inconsistent, e.g. clips of different lengths where one length is needed."""
