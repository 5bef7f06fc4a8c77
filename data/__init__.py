"""Data pipeline: decoding, sampling, transforms, datasets and loaders.

Import each name from the module that defines it (datasets, loader, shards, text, video, ...):

    from data.datasets import create_dataset
    from data.loader import create_loader, create_sampler

    dataset = create_dataset("retrieval_didemo", config, split="train")
    sampler = create_sampler(dataset, True, world_size, rank)
    loader = create_loader(dataset, sampler, batch_size=8, num_workers=4, train=True)
    ...
    print(dataset.bad_inputs.count()); dataset.bad_inputs.reset()   # at epoch end

The package itself imports nothing, so `python -m data.toy` and `python -m data.compress`
start without loading torch and torchvision.
"""
