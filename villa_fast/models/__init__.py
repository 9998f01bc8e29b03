"""UNITER (the model VILLA trains), its task heads, and checkpoint loading.

Imports flow one way: nothing here knows the data storage format or the adversarial loop; the
adversarial step attaches its hooks to ``UniterModel.embeddings.word_embeddings`` (output) and
``UniterModel.img_embeddings.img_linear`` (input).
"""

from .checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointShapeError,
    LoadReport,
    init_from_hf_bert,
    load_pretrained,
    normalize_state_dict,
    official_state_dict,
    read_state_dict,
    save_safetensors,
)
from .config import UniterConfig
from .heads import (
    UniterForImageTextRetrieval,
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForNlvr2Triplet,
    UniterForPretraining,
    UniterForReferringExpression,
    UniterForVcr,
    UniterForVqa,
    build_model,
)
from .ot import optimal_transport_dist
from .uniter import UniterModel

__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointShapeError",
    "LoadReport",
    "UniterConfig",
    "UniterForImageTextRetrieval",
    "UniterForNlvr2Paired",
    "UniterForNlvr2PairedAttn",
    "UniterForNlvr2Triplet",
    "UniterForPretraining",
    "UniterForReferringExpression",
    "UniterForVcr",
    "UniterForVqa",
    "UniterModel",
    "build_model",
    "init_from_hf_bert",
    "load_pretrained",
    "normalize_state_dict",
    "official_state_dict",
    "optimal_transport_dist",
    "read_state_dict",
    "save_safetensors",
]
