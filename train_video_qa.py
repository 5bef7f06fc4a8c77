"""Fine-tune and evaluate TESTA on open-ended video question answering (ActivityNet-QA).

Trains the question encoder and answer decoder, validates every epoch (keeping
checkpoint_best.pth by accuracy), then tests with the best weights. Inference `rank`
scores the answer list; `generate` decodes freely. `--evaluate` only tests `pretrained`.
Predictions go to output_dir/result/<split>_<tag>.json as [{question_id, answer}].
"""
import json

import torch

import utils
from data import create_split_loaders, vqa_collate_fn
from models import build_qa_model


def parse_args():
    return utils.build_arg_parser(__doc__).parse_args()


@torch.no_grad()
def predict(model, loader, dataset, run) -> list[dict]:
    """Answers for this rank's questions, merged over ranks (sorted by question id)."""
    model.eval()
    config = run.config
    inference = config.get("inference", "rank")
    if inference not in ("rank", "generate"):
        raise utils.ConfigError(f"inference must be 'rank' or 'generate', got {inference!r}")
    answer_ids, answer_mask, _ = model.tokenize_answers(dataset.answer_list)
    results = []
    logger = utils.MetricLogger()
    for video, questions, question_ids in logger.log_every(loader, 10, f"Answering ({inference}):"):
        video = video.to(run.device, non_blocking=True).permute(0, 2, 1, 3, 4)
        with run.precision.autocast():
            if inference == "rank":
                best = model.rank_answers(video, list(questions), answer_ids, answer_mask, config["k_test"])
                answers = [dataset.answer_list[i] for i in best.tolist()]
            else:
                answers = model.generate_answers(video, list(questions))
        results += [{"question_id": qid, "answer": answer} for qid, answer in zip(question_ids, answers)]
    return utils.merge_rank_results(results)


def evaluate(model, loader, dataset, run, split: str, tag: str) -> dict:
    predictions = predict(utils.unwrap_model(model), loader, dataset, run)
    if utils.is_main_process():
        result_dir = run.output_dir / "result"
        result_dir.mkdir(exist_ok=True)
        (result_dir / f"{split}_{tag}.json").write_text(json.dumps(predictions))
    asked = set(dataset.question_ids)  # questions whose video exists
    answers = {qid: answer for qid, answer in dataset.answers.items() if qid in asked}
    return utils.qa_accuracy({p["question_id"]: p["answer"] for p in predictions}, answers,
                             dataset.question_types or None)


def main():
    args = parse_args()
    run = utils.setup_run(args)
    config = run.config
    utils.require_keys(config, ["dataset", "video_root", "ann_root", "k_test"], "video QA")
    splits = ["test"] if args.evaluate else ["train", "val", "test"]
    datasets, loaders = create_split_loaders(config["dataset"], config, splits, utils.get_world_size(),
                                             utils.get_rank(), run.seed, train_collate_fn=vqa_collate_fn,
                                             pin_memory=run.device.type == "cuda")

    model = build_qa_model(config, config.get("pretrained") or None).to(run.device)
    utils.print_model_summary(model, model.visual_encoder, config, args.flop_counter)
    protocol = utils.evaluation_protocol(config, inference=config.get("inference", "rank"))

    def test(tested_model) -> dict:
        tag = "zero_shot" if args.evaluate else "best"
        return evaluate(tested_model, loaders["test"], datasets["test"], run, "test", tag)

    if args.evaluate:
        utils.report_test(run, model, test, "evaluate.txt", protocol)
        return

    def compute_losses(model, batch, context):
        video, questions, answers, weights, n = batch
        return {"loss": model(video.permute(0, 2, 1, 3, 4), questions, answers, n, weights)}

    utils.fit(run, model, loaders["train"], compute_losses, "cosine",
              validate=lambda m, epoch: evaluate(m, loaders["val"], datasets["val"], run, "val", f"epoch{epoch}"),
              best_metric="accuracy", test=test, protocol=protocol,
              bad_input_datasets=[datasets["train"]])


if __name__ == "__main__":
    utils.run_cli(main)
