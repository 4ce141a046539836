"""LLaVA data: records, templates, images, a shared index, resumable sampling, and the ``mm-data`` tool.

What the training loop needs::

    from mm_plugin.data import BAD_REASONS, build_data_iterators, load_data_config, load_tokenizer

Nothing here imports megatron; DataLoader workers only need torch, numpy, Pillow and the tokenizer.
"""

from .collate import Collator
from .config import DataConfig, ImagePreprocessConfig, load_data_config
from .dataset import LlavaDataset
from .errors import BAD_REASONS, BadSample, DataError, TooManyBadSamples
from .images import ImageProcessor
from .index import RecordIndex
from .loader import bad_counts_by_reason, build_data_iterators, build_datasets
from .sampler import TrainingSampler
from .tokenization import IGNORE_INDEX, IMAGE_TOKEN_INDEX, get_template, load_tokenizer, tokenizer_image_token

__all__ = [
    "BAD_REASONS",
    "BadSample",
    "Collator",
    "DataConfig",
    "DataError",
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "ImagePreprocessConfig",
    "ImageProcessor",
    "LlavaDataset",
    "RecordIndex",
    "TooManyBadSamples",
    "TrainingSampler",
    "bad_counts_by_reason",
    "build_data_iterators",
    "build_datasets",
    "get_template",
    "load_data_config",
    "load_tokenizer",
    "tokenizer_image_token",
]
