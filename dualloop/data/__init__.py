"""On-disk datasets → samples → batches. Imports nothing else of dualloop (take plain dicts/keywords).

    ds = open_dataset(kind, root, **options)     # "sav" | "sa1b" | "openimages" | "refcoco"
    mix = build_mixture(specs, seed=0)           # specs: [{name, kind, root, repeats, **options}]
    sampler = MixtureSampler(len(mix), num_replicas=W, rank=r, seed=0)
    loader = DataLoader(mix, batch_size=B, sampler=sampler, collate_fn=collate_samples)
"""
from .base import DataError, Reader
from .collate import collate_samples
from .masks import BadSample, decode_rle, decode_segmentation, encode_rle, read_image, read_png_mask
from .mixture import MixtureDataset, MixtureSampler, build_mixture, open_dataset
from .synthetic import write_synthetic_corpus

__all__ = [
    "BadSample", "DataError", "MixtureDataset", "MixtureSampler", "Reader", "build_mixture", "collate_samples",
    "decode_rle", "decode_segmentation", "encode_rle", "open_dataset", "read_image", "read_png_mask",
    "write_synthetic_corpus",
]
