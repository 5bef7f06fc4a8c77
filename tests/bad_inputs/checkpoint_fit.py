"""Bad inputs: a checkpoint must fit the model it is loaded into (docs/reliability.md)."""
from tests.bad_inputs import Case, Workspace
from tests.bad_inputs.resume_fit import first_run

SETTINGS_DIFFER = r"checkpoint_best\.pth was written for another model: "
BLOCKS_DIFFER = (r"retrieval\.pth \(video retrieval checkpoint\) does not fit this model: visual_encoder\.blocks, "
                 r"visual_encoder_m\.blocks: ")


def evaluate_own_checkpoint(*overrides):
    """--evaluate the best weights of a toy run this project trained (they record their settings)."""
    return lambda ws: ws.retrieval(f"pretrained={first_run(ws) / 'checkpoint_best.pth'}", *overrides, "--evaluate")


def empty_file(ws: Workspace) -> None:
    (ws.folder / "empty.pth").touch()


def truncated_file(ws: Workspace) -> None:
    data = ws.checkpoints["retrieval"].read_bytes()
    (ws.folder / "truncated.pth").write_bytes(data[:len(data) // 2])


CASES: list[Case] = [
    Case("qa_checkpoint_for_retrieval",
         lambda ws: ws.retrieval(f"pretrained={ws.checkpoints['qa']}", "--evaluate"),
         r"is a video QA checkpoint and does not fit this retrieval model"),
    Case("own_checkpoint_with_more_blocks", evaluate_own_checkpoint("depth=3"),
         SETTINGS_DIFFER + r"depth=2 there, depth=3 in this config$", setup=first_run),
    Case("own_checkpoint_with_other_heads", evaluate_own_checkpoint("num_heads=4"),
         SETTINGS_DIFFER + r"num_heads=2 there, num_heads=4 in this config$", setup=first_run),
    Case("own_checkpoint_with_other_width", evaluate_own_checkpoint("vision_width=32"),
         SETTINGS_DIFFER + r"vision_width=64 there, vision_width=32 in this config$", setup=first_run),
    Case("own_checkpoint_with_other_patches", evaluate_own_checkpoint("patch_size=8"),
         SETTINGS_DIFFER + r"patch_size=16 there, patch_size=8 in this config$", setup=first_run),
    Case("released_checkpoint_with_extra_blocks",
         lambda ws: ws.retrieval(f"pretrained={ws.checkpoints['retrieval']}", "depth=1", "--evaluate"),
         BLOCKS_DIFFER + r"2 blocks in the file, 1 in the model \(config key depth\)$"),
    Case("released_checkpoint_with_missing_blocks",
         lambda ws: ws.retrieval(f"pretrained={ws.checkpoints['retrieval']}", "depth=3", "--evaluate"),
         BLOCKS_DIFFER + r"2 blocks in the file, 3 in the model \(config key depth\)$"),
    Case("empty_pretrained", lambda ws: ws.retrieval(f"pretrained={ws.folder / 'empty.pth'}", "--evaluate"),
         r"cannot read checkpoint .*empty\.pth: the file is empty \(0 bytes", setup=empty_file),
    Case("truncated_pretrained", lambda ws: ws.retrieval(f"pretrained={ws.folder / 'truncated.pth'}", "--evaluate"),
         r"cannot read checkpoint .*truncated\.pth: the file \(\d+ bytes\) is truncated or damaged",
         setup=truncated_file),
    Case("empty_checkpoint_to_resume", lambda ws: ws.retrieval("--checkpoint", str(ws.folder / "empty.pth")),
         r"cannot read checkpoint .*empty\.pth: the file is empty \(0 bytes", setup=empty_file),
]
