"""Streamed pre-training: the `pretrain` dataset read from WebDataset tar shards
(written by `python -m data.pack_shards`) instead of one file per video.

    train_shards: shards/pretrain-{000000..000123}.tar     # or a list; URLs and `pipe:` commands too

Each epoch the shard list is shuffled from (seed, epoch), the same on every rank, then dealt
out: rank r takes every world_size-th shard, and each of its DataLoader workers every
num_workers-th of those. Samples pass through a shuffle buffer seeded by (seed, epoch, rank,
worker) and are decoded like PretrainDataset's (same frame sampling, transforms, caption
cleaning); a sample's random choices come from (seed, epoch, shard name, key) alone.

Every rank takes floor(total_samples / (world_size * batch_size)) batches per epoch, or DDP
would hang on the rank that ran out first. Each worker's share of those batches follows the
number of samples its shards hold, and a worker whose shards run out starts them again
(webdataset's with_epoch), so a rank with fewer samples wraps around.
"""
import io
import json
import random
import re
import sys
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from configs.keys import ConfigError, value
from runtime.distributed import get_rank, get_world_size
from runtime.errors import DataError

from .datasets import VIDEO_EXTENSIONS, ClipDataset, create_dataset
from .text import pre_caption
from .video import VideoReadError

MANIFEST = "manifest.json"  # written by data.pack_shards beside the shards
METADATA_FIELDS = ("txt", "json")
_URL_SCHEME = re.compile(r"^[a-zA-Z][\w+.-]*:")  # http:, pipe:, s3: ... (not a local path)
_few_shards_warned = False


def expand_shards(patterns):
    """Brace patterns (`a-{000..009}.tar`), paths and URLs -> the list of shard URLs."""
    import webdataset
    urls = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        urls += webdataset.shardlists.expand_urls(pattern)
    return urls


def is_local(url):
    return not _URL_SCHEME.match(url)


def warn_about_shell_commands(urls):
    """`pipe:` shards run a shell command each (webdataset's way to stream from anywhere): a config
    from elsewhere can run any command this way, so say which ones will run."""
    commands = [url[len("pipe:"):].strip() for url in urls if url.startswith("pipe:")]
    if commands:
        more = f" (and {len(commands) - 1} more like it)" if len(commands) > 1 else ""
        sys.stderr.write(f"warning: train_shards runs shell commands to read its shards: {commands[0]}{more}\n")


def check_local_shards(urls):
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        raise DataError(f"train_shards: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")


def manifest_sizes(urls):
    """Samples per shard from the manifest.json beside each local shard; None when one has none."""
    manifests = {}
    sizes = []
    for url in urls:
        if not is_local(url):
            return None
        path = Path(url)
        if path.parent not in manifests:
            manifest = path.parent / MANIFEST
            shards = json.loads(manifest.read_text())["shards"] if manifest.is_file() else []
            manifests[path.parent] = {shard["name"]: shard["samples"] for shard in shards}
        if path.name not in manifests[path.parent]:
            return None
        sizes.append(manifests[path.parent][path.name])
    return sizes


def shard_sizes(config, urls):
    """Samples per shard: `train_shards_samples` spread evenly when set, else the manifests."""
    total = value(config, "train_shards_samples")
    if total is not None:
        return [total / len(urls)] * len(urls)
    sizes = manifest_sizes(urls)
    if sizes is None:
        raise ConfigError("train_shards: some shards have no manifest.json entry beside them (URLs, or a "
                          "packing run that has not finished); set train_shards_samples to the number of samples")
    return sizes


def split_batches(steps, expected_samples):
    """`steps` batches dealt out in proportion to each worker's expected samples (largest
    remainders first; a worker with no shards gets none)."""
    total = sum(expected_samples)
    quotas = [steps * samples / total for samples in expected_samples]
    counts = [int(quota) for quota in quotas]
    for worker in sorted(range(len(counts)), key=lambda w: counts[w] - quotas[w])[:steps - sum(counts)]:
        counts[worker] += 1
    return counts


def warn_once_about_few_shards(num_shards, world_size, num_workers):
    global _few_shards_warned
    if num_shards < world_size * num_workers and not _few_shards_warned:
        _few_shards_warned = True
        sys.stderr.write(f"warning: train_shards has {num_shards} shards for {world_size} ranks x {num_workers} "
                         "workers; workers without a shard stay idle (and ranks share shards when there are "
                         "fewer shards than ranks). Pack at least ranks x workers shards.\n")


class ShardedPretrainDataset(ClipDataset, IterableDataset):
    """PretrainDataset's items, streamed from tar shards. From ClipDataset it takes the
    training settings, transforms, seed/epoch and bad-input log; as an IterableDataset it
    is loaded without a sampler (set_epoch reaches it through the dataset itself).

    `rank` and `world_size` default to this process's place in the process group."""

    def __init__(self, config, name="pretrain", rank=None, world_size=None):
        super().__init__(config, name, train=True, augment=True)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.shuffle_buffer = value(config, "shard_shuffle_buffer")
        self.batch_size = value(config, "batch_size", f"dataset {name!r}")
        self.urls = expand_shards(value(config, "train_shards"))
        check_local_shards(self.urls)
        if self.rank == 0:
            warn_about_shell_commands(self.urls)
        self.sizes = shard_sizes(config, self.urls)
        total = round(sum(self.sizes))
        self.steps = total // (self.world_size * self.batch_size)
        if self.steps == 0:
            raise ConfigError(f"train_shards hold {total} samples, fewer than one batch per rank "
                              f"({self.world_size} ranks x batch_size {self.batch_size})")
        if self.rank == 0:
            warn_once_about_few_shards(len(self.urls), self.world_size, value(config, "num_workers"))

    def __len__(self):
        """Samples this rank takes per epoch: whole batches, the same number on every rank."""
        return self.steps * self.batch_size

    def rank_shards(self):
        """This rank's (url, samples) this epoch: the list shuffled from (seed, epoch), then every world_size-th."""
        order = list(zip(self.urls, self.sizes))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order[self.rank::self.world_size] or [order[self.rank % len(order)]]

    def worker_samples(self, shards, num_workers):
        """Samples each worker yields this epoch, in whole batches, `self.steps` batches in all."""
        expected = [sum(size for _, size in shards[worker::num_workers]) for worker in range(num_workers)]
        return [batches * self.batch_size for batches in split_batches(self.steps, expected)]

    def __iter__(self):
        import webdataset
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.rank_shards()
        wanted = self.worker_samples(shards, num_workers)[worker]
        if wanted == 0:
            return
        pipeline = webdataset.DataPipeline(
            webdataset.SimpleShardList([url for url, _ in shards]),
            webdataset.split_by_worker,  # the same every-num_workers-th split as worker_samples
            webdataset.tarfile_to_samples(handler=self.skip_broken_shard),
            webdataset.shuffle(self.shuffle_buffer,
                               rng=random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")),
            webdataset.map(self.decode),
        ).with_epoch(wanted)  # repeats the worker's shards until `wanted` samples came out
        count = 0
        for count, item in enumerate(pipeline, 1):
            yield item
        if count < wanted:
            raise DataError(f"{self.name}: the shards {[url for url, _ in shards[worker::num_workers]]} gave "
                            f"{count} readable samples of the {wanted} this worker needs; "
                            f"see {self.bad_inputs.paths()[:5]}")

    def skip_broken_shard(self, error):
        """A shard that cannot be opened or read on (truncated, a failed download) is recorded and
        left; the worker's other shards, read again when needed, make up its samples."""
        url = error.args[-1] if len(error.args) > 1 else None  # webdataset appends the shard's url
        self.bad_inputs.record(f"shard {url or '(unnamed)'}", f"{type(error).__name__}: {error.args[0]}")
        return True

    def sample_rng(self, sample):
        return random.Random(f"{self.seed}/{self.epoch}/{Path(sample['__url__']).name}/{sample['__key__']}")

    def decode(self, sample):
        """(clip, caption) of a shard sample; None (recorded as a bad input) when it cannot be decoded."""
        try:
            return self.item_of_sample(sample, self.sample_rng(sample))
        except VideoReadError:
            return None

    def item_of_sample(self, sample, rng):
        """The sample's (clip, cleaned caption), every random choice drawn from `rng` as
        PretrainDataset.item draws them; raises VideoReadError (recorded) when undecodable."""
        name = f"{sample['__key__']} in {sample['__url__']}"
        if "json" in sample:
            name = f"{json.loads(sample['json'])['path']} ({name})"
        media = [field for field in sample if field not in METADATA_FIELDS and not field.startswith("__")]
        if len(media) != 1:
            reason = f"expected one file beside txt/json, found {media}"
            self.bad_inputs.record(name, reason)
            raise VideoReadError(name, reason)
        data = sample[media[0]]
        if f".{media[0]}" in VIDEO_EXTENSIONS:
            clip = self.load_video(data, rng, name)
        else:
            clip = self.load_image(io.BytesIO(data), rng, name)
        return clip, pre_caption(sample["txt"].decode("utf-8"), self.max_words)


def create_pretrain_dataset(name, config, rank=None, world_size=None):
    """The streamed dataset when the config has `train_shards`, else the file-per-video one."""
    if config.get("train_shards"):
        return ShardedPretrainDataset(config, name, rank, world_size)
    return create_dataset(name, config)
