"""Bad inputs: values (docs/reliability.md).

Every config value is checked when the config is loaded, before any data or model work: an
error case ends in seconds (timeout=60), not after a training epoch. A key the run never reads,
or a testa_r the encoder cuts, pads or clamps, is one `warning:` line and the run goes on.
"""
from tests.bad_inputs import Case
from tests.helpers import REPO_ROOT

QUICK = 60  # seconds: an error case fails at start-up


def _error(name, command, expect):
    return Case(name, command, expect, timeout=QUICK)


def _warning(name, command, expect):
    return Case(name, command, expect, exit_code=0, stream="warning")


def _error_in_the_file(name, key: str, text: str, expect):
    """A toy retrieval run whose config file, a copy of configs/toy/retrieval.yaml in the case's
    folder, says `key: text`."""
    def setup(ws):
        lines = (REPO_ROOT / "configs/toy/retrieval.yaml").read_text().splitlines()
        lines = [line for line in lines if not line.startswith(f"{key}:")] + [f"{key}: {text}"]
        (ws.folder / "retrieval.yaml").write_text("\n".join(lines) + "\n")

    def command(ws):
        return [str(ws.folder / "retrieval.yaml") if arg == "configs/toy/retrieval.yaml" else arg
                for arg in ws.retrieval()]
    return Case(name, command, expect, setup=setup, timeout=QUICK)


CASES: list[Case] = [
    # counts that must be positive or at least zero
    _error("k_test_zero", lambda ws: ws.retrieval("k_test=0"),
           r"^error: config key 'k_test' in override 'k_test=0' must be >= 1, got 0$"),
    _error("batch_size_train_zero", lambda ws: ws.qa("batch_size_train=0"),
           r"config key 'batch_size_train' in override 'batch_size_train=0' must be >= 1, got 0"),
    _error("num_workers_negative", lambda ws: ws.pretrain("num_workers=-1"),
           r"config key 'num_workers' in override 'num_workers=-1' must be >= 0, got -1"),
    _error("num_frm_train_zero", lambda ws: ws.retrieval("num_frm_train=0"),
           r"config key 'num_frm_train' in override 'num_frm_train=0' must be >= 1, got 0"),
    _error_in_the_file("k_test_zero_in_the_file", "k_test", "0",
                       r"config key 'k_test' in \S+/retrieval\.yaml must be >= 1, got 0"),
    # ranges
    _error("alpha_above_one", lambda ws: ws.pretrain("alpha=1.5"),
           r"config key 'alpha' in override 'alpha=1.5' must be <= 1, got 1.5"),
    # sizes that must divide
    _error("image_size_not_a_multiple_of_patch_size", lambda ws: ws.retrieval("image_size=65"),
           r"config key 'image_size' \(65, in override 'image_size=65'\) must be a multiple of 'patch_size' "
           r"\(16, in configs/toy/retrieval\.yaml\)"),
    _error("width_not_a_multiple_of_heads", lambda ws: ws.qa("num_heads=3"),
           r"config key 'vision_width' \(64, in configs/toy/qa\.yaml\) must be a multiple of 'num_heads' "
           r"\(3, in override 'num_heads=3'\)"),
    # enumerations
    _error("merging_type_unknown", lambda ws: ws.retrieval("merging_type=frames"),
           r"config key 'merging_type' in override 'merging_type=frames' must be one of 'frame&patch', 'frame', "
           r"'patch', got 'frames'"),
    _error("attention_type_unknown", lambda ws: ws.pretrain("attention_type=divided"),
           r"config key 'attention_type' .* must be one of 'divided_space_time', .*got 'divided'"),
    _error("inference_unknown", lambda ws: ws.qa("inference=beam"),
           r"config key 'inference' in override 'inference=beam' must be one of 'rank', 'generate', got 'beam'"),
    _error_in_the_file("tie_rule_unknown_in_the_file", "tie_rule", "worst",
                       r"config key 'tie_rule' in \S+/retrieval\.yaml must be one of 'original', 'pessimistic', "
                       r"got 'worst'"),
    # schedules
    _error("testa_r_negative", lambda ws: ws.retrieval("testa_r=[1, 2, -1, 2]"),
           r"config key 'testa_r' in override 'testa_r=\[1, 2, -1, 2\]' has entry -1; entries must be >= 0"),
    _error("testa_r_not_an_integer", lambda ws: ws.qa("testa_r=[1.5, 2]"),
           r"config key 'testa_r' in override 'testa_r=\[1.5, 2\]' has entry 1.5; entries must be int"),
    _warning("testa_r_longer_than_the_blocks", lambda ws: ws.retrieval("testa_r=[1, 2, 1, 2, 1, 2]"),
             r"^warning: testa_r: the encoder reads 4 entries \(2 blocks x 2 for divided_space_time frame&patch\): "
             r"the last 2 of the 6 given are ignored$"),
    _warning("testa_r_more_merges_than_tokens", lambda ws: ws.qa("testa_r=[5, 2, 1, 20]"),
             r"testa_r: with clips of 8 frames \(num_frm_train, num_frm_test\) 2 merge counts are clamped to half "
             r"of the tokens that may merge, first in block 1: 3 of its 8 frames, not 5"),
    # keys the run never reads
    _warning("batch_size_on_a_retrieval_run", lambda ws: ws.retrieval("batch_size=8"),
             r"^warning: a retrieval run does not read 'batch_size' \(pre-training batch per process\); "
             r"it is ignored$"),
    _warning("queue_size_on_a_qa_run", lambda ws: ws.qa("queue_size=64"),
             r"^warning: a video QA run does not read 'queue_size' \(ITC feature queue length \(retrieval and "
             r"pre-training\)\); it is ignored$"),
    _warning("k_test_on_pretraining", lambda ws: ws.pretrain("k_test=4"),
             r"^warning: a pre-training run does not read 'k_test' \(retrieval: candidates re-ranked by ITM per "
             r"query\); it is ignored$"),
]
