"""Fine-tune and evaluate TESTA on paragraph-to-video retrieval.

Datasets: QuerYD, DiDeMo, ActivityNet Captions, Condensed Movies (`dataset:` in the config).
Trains with ITC + ITM, evaluates on val every epoch (keeping checkpoint_best.pth by the mean
recall), then tests with the best weights. `--evaluate` only tests the `pretrained` weights.
"""
import io
import json
import zipfile

import numpy as np
import torch

import utils
from data import create_split_loaders, shard_indices
from models import build_retrieval_model
from models.testa_retrieval import rerank_scores, rows_per_itm_batch

TEXT_BATCH = 256


def parse_args():
    return utils.build_arg_parser(__doc__).parse_args()


def video_batch(video: torch.Tensor) -> torch.Tensor:
    """Loaders give (B, T, C, H, W); the encoder takes (B, C, T, H, W)."""
    return video.permute(0, 2, 1, 3, 4)


def my_shard(num_items: int, unit: int) -> range:
    """This rank's items, in whole batches of ``unit``: any process count computes the same batches."""
    return shard_indices(num_items, utils.get_world_size(), utils.get_rank(), unit)


def gather_in_rank_order(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate every rank's pieces (CPU) in rank order: the dataset order of shard_indices.
    A rank may have none (more ranks than batches)."""
    if utils.get_world_size() == 1 and len(pieces) == 1:
        return pieces[0]  # nothing to gather, and no copy of a possibly huge token cache
    return torch.cat([piece for rank_pieces in utils.gather_objects([p.cpu() for p in pieces])
                      for piece in rank_pieces])


@torch.no_grad()
def cache_video_tokens(model, loader, run, low_resource: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every video's output tokens (the ITM cache) and ITC feature, gathered in dataset order.

    The cache is the memory peak of long-video evaluation: --low_resource_eval keeps it in
    fp16 on the CPU, and each batch is written into one preallocated tensor (a list of batches
    plus its concatenation would need twice the memory) and dropped before the next is encoded.
    """
    device = run.device
    cache_device, cache_dtype = ("cpu", torch.float16) if low_resource else (device, torch.float32)
    video_tokens, video_feats, filled = None, [], 0
    logger = utils.MetricLogger()
    for video, _ in logger.log_every(loader, 10, "Encoding videos:"):
        with run.precision.autocast():
            tokens, feat = model.encode_video(video_batch(video.to(device, non_blocking=True)))
        if video_tokens is None:
            video_tokens = torch.empty((len(loader.sampler), *tokens.shape[1:]), dtype=cache_dtype,
                                       device=cache_device)
        video_tokens[filled:filled + len(tokens)] = tokens
        filled += len(tokens)
        video_feats.append(feat.float())
        del tokens  # else it lives on while the next batch is encoded: two batches beside the cache
    video_tokens = gather_in_rank_order([] if video_tokens is None else [video_tokens]).to(cache_device)
    return video_tokens, gather_in_rank_order(video_feats)


@torch.no_grad()
def score_matrices(model, loader, dataset, run) -> tuple[torch.Tensor, torch.Tensor]:
    """(text x video, video x text) scores: ITC for all pairs, ITM + ITC on each query's top k_test.

    Every rank encodes its shard of the texts and videos; the features are gathered, and
    each rank re-ranks its shard of the queries, so the result equals a single process's.
    """
    model.eval()
    device, config = run.device, run.config

    input_ids, attention_mask = model.tokenize(dataset.text)
    text_feats = []
    texts = my_shard(len(dataset.text), TEXT_BATCH)
    for start in range(texts.start, texts.stop, TEXT_BATCH):
        stop = min(start + TEXT_BATCH, texts.stop)
        with run.precision.autocast():
            text_feats.append(model.encode_text(input_ids[start:stop], attention_mask[start:stop])[1].float())
    text_feat = gather_in_rank_order(text_feats)
    video_tokens, video_feat = cache_video_tokens(model, loader, run, config.get("low_resource_eval", False))

    sims = video_feat.to(device) @ text_feat.to(device).T  # one may sit on the CPU after a gather
    k, batch = config["k_test"], config.get("k_test_batch_size") or 128
    parts = []
    for matrix, video_rows in ((sims, True), (sims.T, False)):
        rows = torch.tensor(my_shard(matrix.shape[0], rows_per_itm_batch(k, batch)), dtype=torch.long)
        with run.precision.autocast():
            part = rerank_scores(model, matrix, k, video_tokens, input_ids, attention_mask, rows, video_rows, batch)
        parts.append(gather_in_rank_order([part]).cpu())  # saved, zipped and ranked on the CPU
    scores_v2t, scores_t2v = parts
    return scores_t2v, scores_v2t


def evaluate(model, loader, dataset, run, split: str) -> dict:
    scores_t2v, scores_v2t = score_matrices(utils.unwrap_model(model), loader, dataset, run)
    if split == "test" and utils.is_main_process():  # kept for analysis and for ensembling runs
        utils.atomic_torch_save({"txt2video": scores_t2v, "video2txt": scores_v2t}, run.output_dir / "scores_test.pt")
    if run.config["dataset"] == "retrieval_condensedmovies" and split == "test":
        # The challenge's test labels are private: write the submission instead of metrics.
        if utils.is_main_process():
            buffer = io.BytesIO()
            np.save(buffer, scores_t2v.numpy())
            with zipfile.ZipFile(run.output_dir / "submission.zip", "w") as archive:
                archive.writestr("sim_matrix_test.npy", buffer.getvalue())
        print(f"wrote {run.output_dir / 'submission.zip'} (text-to-video scores, {tuple(scores_t2v.shape)})")
        return {}
    return utils.retrieval_metrics(scores_t2v, scores_v2t, dataset.txt2video, dataset.video2txt,
                                   run.config.get("tie_rule", "original"))


def main():
    args = parse_args()
    run = utils.setup_run(args)
    config = run.config
    utils.require_keys(config, ["dataset", "video_root", "ann_root", "k_test", "queue_size"], "retrieval")
    if config.get("tie_rule", "original") not in utils.TIE_RULES:
        raise utils.ConfigError(f"tie_rule must be one of {utils.TIE_RULES}, got {config['tie_rule']!r}")
    splits = ["test"] if args.evaluate else ["train", "val", "test"]
    datasets, loaders = create_split_loaders(config["dataset"], config, splits, utils.get_world_size(),
                                             utils.get_rank(), run.seed, pin_memory=run.device.type == "cuda")

    model = build_retrieval_model(config, config.get("pretrained") or None).to(run.device)
    utils.print_model_summary(model, model.visual_encoder, config, args.flop_counter)
    protocol = utils.evaluation_protocol(config)

    def test(tested_model) -> dict:
        return evaluate(tested_model, loaders["test"], datasets["test"], run, "test")

    if args.evaluate:
        utils.report_test(run, model, test, "evaluate.txt", protocol)
        return

    def compute_losses(model, batch, context):
        video, captions, idx = batch
        alpha = utils.alpha_ramp(config["alpha"], context.epoch, context.step, context.steps_per_epoch,
                                 ramp_epochs=1)
        return model(video_batch(video), captions, alpha, idx)

    utils.fit(run, model, loaders["train"], compute_losses, "cosine",
              validate=lambda m, epoch: evaluate(m, loaders["val"], datasets["val"], run, "val"),
              best_metric="r_mean", test=test, protocol=protocol,
              bad_input_datasets=[datasets["train"]])


if __name__ == "__main__":
    utils.run_cli(main)
