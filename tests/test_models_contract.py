"""The checkpoint contract: base-size models from the real configs have the released key names,
shapes, dtypes and tied groups (tests/fixtures/checkpoint_keys). Built on the meta device: no memory."""
from collections import defaultdict

import pytest
import torch

from models import create_model
from tests.helpers import REPO_ROOT, read_yaml

CASES = {
    "testa_retrieval_queryd_f32": ("retrieval", "retrieval_queryd_f32.yaml", {}),
    "testa_retrieval_queryd_f32_lts": ("retrieval", "retrieval_queryd_f32.yaml",
                                       {"learnable_temporal_scaling": True}),
    "testa_retrieval_queryd_f32_space_only": ("retrieval", "retrieval_queryd_f32.yaml",
                                              {"attention_type": "space_only"}),
    "testa_retrieval_queryd_f32_nomerge": ("retrieval", "retrieval_queryd_f32.yaml",
                                           {"token_merging": False}),
    "testa_vqa_activitynet_f32": ("qa", "vqa_activitynet.yaml", {}),
    "testa_vqa_activitynet_f32_lts": ("qa", "vqa_activitynet.yaml", {"learnable_temporal_scaling": True}),
    "testa_vqa_activitynet_f32_space_only": ("qa", "vqa_activitynet.yaml", {"attention_type": "space_only"}),
    "blip_pretrain_timesformer": ("pretrain", "pretrain_timesformer.yaml", {}),
    "blip_pretrain_timesformer_nolts": ("pretrain", "pretrain_timesformer.yaml",
                                        {"learnable_temporal_scaling": False}),
    "blip_pretrain_timesformer_space_only": ("pretrain", "pretrain_timesformer.yaml",
                                             {"attention_type": "space_only"}),
    "blip_pretrain_timesformer_from_blip": ("pretrain", "pretrain_timesformer_from_blip.yaml", {}),
}


@pytest.fixture(scope="module")
def keys_dir(fixtures_dir):
    return fixtures_dir / "checkpoint_keys"


def read_contract(keys_dir, stem):
    entries = []
    for line in (keys_dir / f"{stem}_state_dict.txt").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        entries.append((name, eval(shape), dtype))  # shapes are plain Python lists
    tied = {frozenset(line.split("\t")) for line in (keys_dir / f"{stem}_tied.txt").read_text().splitlines() if line}
    return entries, tied


@pytest.mark.parametrize("stem", sorted(CASES))
def test_state_dict_matches_released_keys(keys_dir, stem):
    task, config_file, overrides = CASES[stem]
    config = {**read_yaml(REPO_ROOT / "configs" / config_file), **overrides}
    with torch.device("meta"):
        model = create_model(config, task)  # `pretrained` is only read by the scripts
    state = model.state_dict(keep_vars=True)
    actual = [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()]
    expected, expected_tied = read_contract(keys_dir, stem)
    assert actual == expected

    groups = defaultdict(list)
    for name, tensor in state.items():
        groups[id(tensor)].append(name)
    assert {frozenset(g) for g in groups.values() if len(g) > 1} == expected_tied
