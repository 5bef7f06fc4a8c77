"""Bad inputs: no number from a broken computation (docs/reliability.md). A NaN or inf in a
feature, score, loss, gradient or weight stops the run with one line naming the tensor and the
batch or step; no metrics computed from it are written and no broken weights are saved."""
import torch

from tests.bad_inputs import Case, Workspace

NOT_WRITTEN = r" while testing; no metrics written to evaluate\.txt$"
# Training at lr 1e12 diverges in its second step: a NaN loss (ITM's hard-negative sampling then
# draws uniformly, so the forward pass ends and the loss is what is reported).
DIVERGED = r"^error: loss\w* is (NaN|inf|-inf) at epoch 0 "


def nan_checkpoint(family: str, prefix: str):
    """A setup writing ws.folder/nan.pth: the toy checkpoint of `family` with every floating
    tensor whose name starts with `prefix` set to NaN."""
    def setup(ws: Workspace) -> None:
        state = torch.load(ws.checkpoints[family], weights_only=True)
        for name, tensor in state["model"].items():
            if name.startswith(prefix) and tensor.is_floating_point():
                tensor.fill_(float("nan"))
        torch.save(state, ws.folder / "nan.pth")
    return setup


def evaluate_nan(script: str, *extra):
    return lambda ws: getattr(ws, script)(f"pretrained={ws.folder / 'nan.pth'}", *extra, "--evaluate")


CASES: list[Case] = [
    Case("retrieval_eval_nan_visual_encoder", evaluate_nan("retrieval"),
         r"^error: non-finite video tokens in evaluation batch 0 \(first at video 0\)" + NOT_WRITTEN,
         setup=nan_checkpoint("retrieval", "visual_encoder.")),
    Case("retrieval_eval_nan_text_projection", evaluate_nan("retrieval"),
         r"^error: non-finite text features in text batch 0 \(first at text 0\)" + NOT_WRITTEN,
         setup=nan_checkpoint("retrieval", "text_proj.")),
    Case("retrieval_eval_nan_itm_head", evaluate_nan("retrieval"),
         r"^error: non-finite ITM scores in video-to-text re-ranking \(first at video 0\)" + NOT_WRITTEN,
         setup=nan_checkpoint("retrieval", "itm_head.")),
    Case("qa_rank_eval_nan_visual_encoder", evaluate_nan("qa", "inference=rank"),
         r"^error: non-finite video features in evaluation batch 0 \(questions \S+ to \S+\)" + NOT_WRITTEN,
         setup=nan_checkpoint("qa", "visual_encoder.")),
    Case("qa_rank_eval_nan_question_encoder", evaluate_nan("qa", "inference=rank"),
         r"^error: non-finite question states in evaluation batch 0 " + r".*" + NOT_WRITTEN,
         setup=nan_checkpoint("qa", "text_encoder.")),
    Case("qa_generate_eval_nan_answer_decoder", evaluate_nan("qa", "inference=generate"),
         r"^error: non-finite answer decoder outputs in evaluation batch 0 " + r".*" + NOT_WRITTEN,
         setup=nan_checkpoint("qa", "text_decoder.")),
    Case("retrieval_training_diverges", lambda ws: ws.retrieval("init_lr=1e12"),
         DIVERGED + r"step 2 \(batch 2/\d+\); no checkpoint written yet$"),
    Case("retrieval_training_diverges_after_a_checkpoint",
         lambda ws: ws.retrieval("init_lr=1e12", "--save_every_steps", "1"),
         DIVERGED + r"step 2 \(batch 2/\d+\); checkpoint_last\.pth from step 1 kept$"),
    Case("retrieval_training_from_nan_weights", lambda ws: ws.retrieval(f"pretrained={ws.folder / 'nan.pth'}"),
         DIVERGED + r"step 1 \(batch 1/\d+\); no checkpoint written yet$",
         setup=nan_checkpoint("retrieval", "visual_encoder.")),
    Case("qa_training_diverges", lambda ws: ws.qa("init_lr=1e12"),
         r"^error: loss is NaN at epoch 0 step 2 \(batch 2/\d+\); no checkpoint written yet$"),
    Case("pretraining_diverges", lambda ws: ws.pretrain("init_lr=1e12", "warmup_steps=0"),
         DIVERGED + r"step \d+ \(batch \d+/\d+\); no checkpoint written yet$"),
]
