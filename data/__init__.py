"""Data pipeline: decoding, sampling, transforms, datasets and loaders.

    dataset = create_dataset("retrieval_didemo", config, split="train")
    samplers = create_sampler([dataset], [True], world_size, rank)
    [loader] = create_loader([dataset], samplers, [8], [4], [True], [None])
    ...
    print(dataset.bad_inputs.count()); dataset.bad_inputs.reset()   # at epoch end
"""
from .datasets import DATASETS, create_dataset
from .loader import EvalShardSampler, create_loader, create_sampler, shard_indices, vqa_collate_fn
from .text import pre_caption, pre_question
from .video import VideoReadError, read_video, sample_frame_indices, worker_init_fn

__all__ = ["DATASETS", "create_dataset", "EvalShardSampler", "create_loader", "create_sampler", "shard_indices",
           "vqa_collate_fn", "pre_caption", "pre_question", "VideoReadError", "read_video",
           "sample_frame_indices", "worker_init_fn"]
