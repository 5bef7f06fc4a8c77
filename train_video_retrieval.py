"""Fine-tune and evaluate TESTA on paragraph-to-video retrieval.

Datasets: QuerYD, DiDeMo, ActivityNet Captions, Condensed Movies (`dataset:` in the config).
Trains with ITC + ITM, evaluates on val every epoch (keeping checkpoint_best.pth by the mean
recall), then tests with the best weights. `--evaluate` only tests the `pretrained` weights.
"""
from configs.keys import value
from data.loader import create_split_loaders
from evaluation import evaluation_protocol, merge_record
from evaluation.retrieval import RetrievalSettings, evaluate_retrieval, withholds_test_labels, write_submission
from models import create_model
from runtime.distributed import get_rank, get_world_size, is_main_process, unwrap_model
from runtime.errors import run_cli
from training.cli import build_arg_parser, setup_run
from training.compile import compile_visual_encoder
from training.fit import fit, report_test
from training.logging import print_model_summary
from training.objectives import retrieval_losses
from utils import atomic_torch_save


def main():
    args = build_arg_parser(__doc__).parse_args()
    run = setup_run(args)
    config = run.config
    settings = RetrievalSettings.from_config(config)
    splits = ["test"] if args.evaluate else ["train", "val", "test"]
    datasets, loaders = create_split_loaders(value(config, "dataset"), config, splits, get_world_size(), get_rank(),
                                             pin_memory=run.device.type == "cuda")
    model = create_model(config, "retrieval", checkpoint=config.get("pretrained") or None).to(run.device)
    print_model_summary(model, model.visual_encoder, config, args.flop_counter)
    if args.compile:
        compile_visual_encoder(model, run.device)

    def evaluate(model, split: str) -> dict:
        labels_private = split == "test" and withholds_test_labels(config)
        metrics, scores_t2v, scores_v2t = evaluate_retrieval(unwrap_model(model), loaders[split], datasets[split],
                                                             run.device, run.precision.autocast, settings,
                                                             labels_private)
        if split == "test" and is_main_process():  # kept for analysis and for ensembling runs
            atomic_torch_save({"txt2video": scores_t2v, "video2txt": scores_v2t}, run.output_dir / "scores_test.pt")
        if labels_private:  # the challenge scores a submission instead of metrics
            if is_main_process():
                write_submission(scores_t2v, run.output_dir / "submission.zip")
            print(f"wrote {run.output_dir / 'submission.zip'} (text-to-video scores, {tuple(scores_t2v.shape)})")
        return metrics

    protocol = evaluation_protocol(config, config.get("pretrained"),
                                   merge=merge_record(model.visual_encoder, config))
    if args.evaluate:
        report_test(run, model, lambda m: evaluate(m, "test"), "evaluate.txt", protocol)
        return

    # The original keeps the epoch with the best text-to-video mean recall on val.
    fit(run, model, loaders["train"], retrieval_losses(value(config, "alpha")), "cosine",
        validate=lambda m, epoch: evaluate(m, "val"), best_metric="txt2video_r_mean",
        test=lambda m: evaluate(m, "test"), protocol=protocol, bad_input_datasets=[datasets["train"]])


if __name__ == "__main__":
    run_cli(main)
