"""Fine-tune and evaluate TESTA on open-ended video question answering (ActivityNet-QA).

Trains the question encoder and answer decoder, validates every epoch (keeping
checkpoint_best.pth by accuracy), then tests with the best weights. Inference `rank`
scores the candidate answers (`answer_candidates`: by default those of the split evaluated,
as the original); `generate` decodes freely. `--evaluate` only tests `pretrained`.
Predictions go to output_dir/result/<split>_<tag>.json as [{question_id, answer}].
"""
import json
import sys

from configs.keys import value
from data.loader import create_split_loaders, vqa_collate_fn
from evaluation import evaluation_protocol, merge_record
from evaluation.qa import evaluate_qa, qa_protocol
from models import create_model
from runtime.distributed import get_rank, get_world_size, is_main_process, unwrap_model
from runtime.errors import run_cli
from training.cli import build_arg_parser, setup_run
from training.compile import compile_visual_encoder
from training.fit import fit, report_test
from training.logging import print_model_summary
from training.objectives import qa_losses


def warn_about_uncovered_answers(dataset, split: str) -> None:
    """A candidate list without a question's true answer caps the accuracy: say so before it is measured."""
    uncovered = dataset.uncovered_questions()
    if uncovered:
        print(f"warning: {len(uncovered)} of {len(dataset.question_ids)} {split} questions have a true answer "
              f"outside the {len(dataset.answer_list)} candidates (answer_candidates: {dataset.candidate_rule}): "
              f"rank inference cannot answer them, so accuracy is at most {dataset.candidate_coverage():.1f}%",
              file=sys.stderr)


def main():
    args = build_arg_parser(__doc__).parse_args()
    run = setup_run(args)
    config = run.config
    inference, k_test = value(config, "inference"), value(config, "k_test", "video QA")
    splits = ["test"] if args.evaluate else ["train", "val", "test"]
    datasets, loaders = create_split_loaders(value(config, "dataset"), config, splits, get_world_size(), get_rank(),
                                             train_collate_fn=vqa_collate_fn, pin_memory=run.device.type == "cuda")
    model = create_model(config, "qa", checkpoint=config.get("pretrained") or None).to(run.device)
    print_model_summary(model, model.visual_encoder, config, args.flop_counter)
    if args.compile:
        compile_visual_encoder(model, run.device)

    def evaluate(model, split: str, tag: str) -> dict:
        metrics, predictions = evaluate_qa(unwrap_model(model), loaders[split], datasets[split], run.device,
                                           run.precision.autocast, inference, k_test)
        if is_main_process():
            (run.output_dir / "result").mkdir(exist_ok=True)
            (run.output_dir / "result" / f"{split}_{tag}.json").write_text(json.dumps(predictions))
        return metrics

    if inference == "rank":
        for split in splits[-1:] if args.evaluate else splits[1:]:
            warn_about_uncovered_answers(datasets[split], split)
    protocol = evaluation_protocol(config, config.get("pretrained"), **qa_protocol(inference, datasets["test"]),
                                   merge=merge_record(model.visual_encoder, config))
    if args.evaluate:
        report_test(run, model, lambda m: evaluate(m, "test", "zero_shot"), "evaluate.txt", protocol)
        return

    fit(run, model, loaders["train"], qa_losses, "cosine",
        validate=lambda m, epoch: evaluate(m, "val", f"epoch{epoch}"), best_metric="accuracy",
        test=lambda m: evaluate(m, "test", "best"), protocol=protocol, bad_input_datasets=[datasets["train"]])


if __name__ == "__main__":
    run_cli(main)
