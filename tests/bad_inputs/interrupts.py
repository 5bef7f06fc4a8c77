"""Bad inputs: interrupts (docs/reliability.md). Ctrl-C ends a run with one line that says where
it stopped and what checkpoint_last.pth holds, and exit status 130 (128 + SIGINT), no traceback."""
from tests.bad_inputs import Case

# Ctrl-C after the first optimiser step: the run sends itself SIGINT there (training/fault_injection.py),
# so the signal lands mid-run however busy the machine is (a signal sent from outside after the first
# progress line can arrive after a short run has ended).
CTRL_C_AFTER_FIRST_STEP = {"TESTA_INTERRUPT_AFTER_STEP": "1"}


CASES: list[Case] = [
    # A checkpoint after every step: the one of the step before is on disk.
    Case("ctrl_c_in_retrieval_training", lambda ws: ws.retrieval("batch_size_train=2", "--save_every_steps", "1"),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/5\); checkpoint_last\.pth from step \d+ kept$",
         exit_code=130, env=CTRL_C_AFTER_FIRST_STEP),
    # Checkpoints only at the epoch's end (11 steps away).
    Case("ctrl_c_in_qa_training_before_any_checkpoint", lambda ws: ws.qa(),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/11\); no checkpoint written yet$", exit_code=130,
         env=CTRL_C_AFTER_FIRST_STEP),
    Case("ctrl_c_in_pretraining", lambda ws: ws.pretrain("batch_size=2"),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/\d+\); no checkpoint written yet$", exit_code=130,
         env=CTRL_C_AFTER_FIRST_STEP),
]
