"""Data pipeline: decoding, sampling, transforms, datasets and loaders.

    dataset = create_dataset("retrieval_didemo", config, split="train")
    samplers = create_sampler([dataset], [True], world_size, rank)
    [loader] = create_loader([dataset], samplers, [8], [4], [True], [None])
    ...
    print(dataset.bad_inputs.count()); dataset.bad_inputs.reset()   # at epoch end

Names are imported on first use, so `python -m data.toy` and `python -m data.compress`
start without loading torch and torchvision.
"""
import importlib

_EXPORTS = {
    "datasets": ("DATASETS", "create_dataset"),
    "loader": ("EvalShardSampler", "create_loader", "create_sampler", "create_split_loaders", "shard_indices",
               "vqa_collate_fn"),
    "shards": ("ShardedPretrainDataset", "create_pretrain_dataset"),
    "text": ("pre_caption", "pre_question"),
    "video": ("VideoReadError", "read_video", "sample_frame_indices", "worker_init_fn"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
