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


def create_sampler(dataset, shuffle, num_tasks, global_rank, seed=0, batch_size=1):
    """The sampler of one dataset. Training (shuffle=True): DistributedSampler reshuffled per
    epoch from seed + epoch (the loop calls sampler.set_epoch(epoch)). Evaluation:
    EvalShardSampler in whole batches of `batch_size`. Streamed (iterable) datasets split and
    shuffle themselves: None."""
    if isinstance(dataset, IterableDataset):
        return None
    if shuffle:
        return DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=True, seed=seed)
    return EvalShardSampler(dataset, num_tasks, global_rank, batch_size)


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


def create_loader(dataset, sampler, batch_size, num_workers, train, collate_fn=None, pin_memory=True):
    """The DataLoader of one dataset. A training loader (train=True) drops the last partial
    batch, and shuffles when it has no sampler (unless the dataset is streamed). Workers decode
    single-threaded (worker_init_fn) so num_workers processes share the CPU."""
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, sampler=sampler,
        shuffle=train and sampler is None and not isinstance(dataset, IterableDataset),
        collate_fn=collate_fn, drop_last=train,
        worker_init_fn=worker_init_fn, persistent_workers=False)


def create_split_loaders(name, config, splits, num_tasks, global_rank, train_collate_fn=None, pin_memory=True):
    """Datasets and loaders of `splits` of dataset `name`, keyed by split: shuffled training
    ('train', batch_size_train, shuffled from shuffle_seed and the epoch) and sharded
    evaluation (batch_size_test). Config keys such as substitute_black_on_error reach the
    datasets through `config`, and the training items' randomness follows the config's seed
    and the process rank (see ClipDataset)."""
    from .datasets import create_dataset

    datasets = {split: create_dataset(name, config, split) for split in splits}
    batch_sizes = {split: value(config, "batch_size_train" if split == "train" else "batch_size_test", name)
                   for split in splits}
    seed, num_workers = value(config, "shuffle_seed"), value(config, "num_workers")
    loaders = {}
    for split, dataset in datasets.items():
        train = split == "train"
        sampler = create_sampler(dataset, train, num_tasks, global_rank, seed, batch_sizes[split])
        loaders[split] = create_loader(dataset, sampler, batch_sizes[split], num_workers, train,
                                       collate_fn=train_collate_fn if train else None, pin_memory=pin_memory)
    return datasets, loaders
