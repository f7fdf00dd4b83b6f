"""Data: occupation statistics, attributes, templates, dataset records and their kinds (``kinds``),
tokenization, pipelines.

    from distfair_jax import data
    ds = data.build_dataset("gender_real_us")               # records in memory (or out_dir=...)
    encoder = data.Encoder(tokenizer, attribute=data.get_attribute("gender"))  # encoder.steering_ids
    batches = data.make_batches(ds["sft"], encoder, "sft", batch_size=4, seed=0)

``make_batches`` / ``steps_per_epoch`` live in ``data.pipeline`` (imports grain on first use).
"""

from __future__ import annotations

from distfair_jax.data.attributes import (AttributeSpec, BUILTIN_ATTRIBUTES, Category,
                                          attribute_from_dict, get_attribute)
from distfair_jax.data.build import (DATASETS, Dataset, DatasetSpec, allocate, build_dataset,
                                     build_records, dataset_spec, load_spec, read_dataset,
                                     read_jsonl, resolve_spec, validate_records, write_dataset,
                                     write_jsonl)
from distfair_jax.data.occupations import Occupation, OccupationTable, load_table
from distfair_jax.data.templates import TemplateSet, builtin_templates, with_target_instruction
from distfair_jax.data.collate import tokenize_batch
from distfair_jax.data.tokenize import Encoder, bucket_lengths, steering_token_ids

__all__ = [
    "AttributeSpec", "BUILTIN_ATTRIBUTES", "Category", "attribute_from_dict", "get_attribute",
    "DATASETS", "Dataset", "DatasetSpec", "allocate", "build_dataset", "build_records",
    "dataset_spec", "load_spec", "read_dataset", "read_jsonl", "resolve_spec", "validate_records",
    "write_dataset", "write_jsonl", "Occupation", "OccupationTable", "load_table", "TemplateSet",
    "builtin_templates", "with_target_instruction", "Encoder", "bucket_lengths",
    "steering_token_ids", "tokenize_batch", "make_batches", "steps_per_epoch", "BatchPipeline",
]


def __getattr__(name: str):
  if name in ("make_batches", "steps_per_epoch", "BatchPipeline"):
    from distfair_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f"module 'distfair_jax.data' has no attribute {name!r}")
