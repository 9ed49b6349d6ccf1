"""umT5's tokenizer from a SentencePiece model, e.g. the one ComfyUI's umT5 files carry.

ComfyUI tokenises Wan prompts with SentencePiece itself, from the `spiece_model` tensor of the
text-encoder file. `tokenizer_from_spiece` turns those bytes into a transformers tokenizer the way
transformers converts a `spiece.model` (pieces and scores into a unigram model, the model's
precompiled normaliser), without needing the protobuf package: the normaliser is read from the
model's bytes directly.
"""

from __future__ import annotations

import torch

from ..errors import ModelFileError


def _proto_field(data: bytes, field: int) -> bytes | None:
    """The first length-delimited `field` of a protobuf message (enough to read a SentencePiece
    model's normaliser without the protobuf package)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(data, i)
            if num == field:
                return data[i:i + n]
            i += n
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
    return None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def tokenizer_from_spiece(model: bytes | torch.Tensor, source: str = "spiece_model"):
    """A transformers T5 tokenizer (umT5's conventions: pad 0, `</s>` 1 appended, unk 2) from a
    SentencePiece model's bytes, e.g. the `spiece_model` tensor of ComfyUI's umT5 files. Its
    pieces, scores and normaliser are the model's, as transformers' own conversion takes them."""
    import sentencepiece
    from transformers import T5Tokenizer

    data = model.numpy().tobytes() if isinstance(model, torch.Tensor) else bytes(model)
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        normalizer = _proto_field(data, 3)  # ModelProto.normalizer_spec
        charsmap = _proto_field(normalizer, 2) if normalizer else None  # NormalizerSpec.precompiled_charsmap
    except Exception as e:
        raise ModelFileError(f"{source}: not a readable SentencePiece model ({type(e).__name__}: {e})") from e
    if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (0, 1, 2):
        raise ModelFileError(f"{source}: SentencePiece model with pad/eos/unk ids {(sp.pad_id(), sp.eos_id(), sp.unk_id())}, "
                             "umT5's are (0, 1, 2)")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, _spm_precompiled_charsmap=charsmap or None)
