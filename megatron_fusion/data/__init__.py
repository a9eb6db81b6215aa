"""Data for both stages: synthetic tasks, JSONL reading, SFT and preference datasets."""

from megatron_fusion.data.jsonl import JSONLError, read_jsonl, write_jsonl
from megatron_fusion.data.preference import PreferenceDataset
from megatron_fusion.data.sft import DatasetStats, EncodedSample, SFTDataset, encode_segments

__all__ = ["JSONLError", "read_jsonl", "write_jsonl", "SFTDataset", "PreferenceDataset",
           "DatasetStats", "EncodedSample", "encode_segments"]
