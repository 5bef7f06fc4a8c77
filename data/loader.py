"""Samplers, evaluation sharding, the QA collate and the DataLoader factory."""
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from configs.keys import value
from runtime.sharding import shard_indices

from .video import worker_init_fn


class EvalShardSampler(Sampler):
    def __init__(self, dataset, num_replicas, rank, unit=1):
        self.indices = shard_indices(len(dataset), num_replicas, rank, unit)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def create_sampler(datasets, shuffles, num_tasks, global_rank, seed=0, batch_sizes=None):
    """Training (shuffle=True): DistributedSampler reshuffled per epoch from seed + epoch
    (the loop calls sampler.set_epoch(epoch)). Evaluation: EvalShardSampler in whole batches
    of `batch_sizes` (one per dataset; default 1). Streamed (iterable) datasets split and
    shuffle themselves: None."""
    batch_sizes = batch_sizes or [1] * len(datasets)
    return [_sampler_of(dataset, shuffle, num_tasks, global_rank, seed, unit)
            for dataset, shuffle, unit in zip(datasets, shuffles, batch_sizes)]


def _sampler_of(dataset, shuffle, num_tasks, global_rank, seed, unit):
    if isinstance(dataset, IterableDataset):
        return None
    if shuffle:
        return DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=True, seed=seed)
    return EvalShardSampler(dataset, num_tasks, global_rank, unit)


def vqa_collate_fn(batch):
    """QA training batch -> (videos, questions, answers (flat), weights (flat tensor), n), where
    n[i] is the number of answers of question i."""
    videos, questions, answers, weights, counts = [], [], [], [], []
    for video, question, item_answers, item_weights in batch:
        videos.append(video)
        questions.append(question)
        answers += item_answers
        weights += item_weights
        counts.append(len(item_answers))
    return torch.stack(videos), questions, answers, torch.tensor(weights), counts


def create_loader(datasets, samplers, batch_size, num_workers, is_trains, collate_fns, pin_memory=True):
    """One DataLoader per dataset; training loaders drop the last partial batch. Workers
    decode single-threaded (worker_init_fn) so num_workers processes share the CPU."""
    loaders = []
    for dataset, sampler, size, workers, is_train, collate_fn in zip(
            datasets, samplers, batch_size, num_workers, is_trains, collate_fns):
        loaders.append(DataLoader(
            dataset, batch_size=size, num_workers=workers, pin_memory=pin_memory, sampler=sampler,
            shuffle=is_train and sampler is None and not isinstance(dataset, IterableDataset),
            collate_fn=collate_fn, drop_last=is_train,
            worker_init_fn=worker_init_fn, persistent_workers=False))
    return loaders


def create_split_loaders(name, config, splits, num_tasks, global_rank, train_collate_fn=None, pin_memory=True):
    """Datasets and loaders of `splits` of dataset `name`, keyed by split: shuffled training
    ('train', batch_size_train, shuffled from shuffle_seed and the epoch) and sharded
    evaluation (batch_size_test). Config keys such as substitute_black_on_error reach the
    datasets through `config`, and the training items' randomness follows the config's seed
    and the process rank (see ClipDataset)."""
    from .datasets import create_dataset

    datasets = [create_dataset(name, config, split) for split in splits]
    is_train = [split == "train" for split in splits]
    batch_sizes = [value(config, "batch_size_train" if train else "batch_size_test", name) for train in is_train]
    samplers = create_sampler(datasets, is_train, num_tasks, global_rank, value(config, "shuffle_seed"), batch_sizes)
    loaders = create_loader(datasets, samplers, batch_sizes, [value(config, "num_workers")] * len(splits), is_train,
                            [train_collate_fn if train else None for train in is_train], pin_memory)
    return dict(zip(splits, datasets)), dict(zip(splits, loaders))
