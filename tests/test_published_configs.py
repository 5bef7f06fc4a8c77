"""The published configs run the original's recipe: every value equals the original's, key by key.

tests/fixtures/original_configs.json holds, per published config, the values the original's
YAML file sets and what its scripts set instead of or beside the YAML (its README note says
which). Paths differ by design and are left out.
"""
import json

import pytest

from configs.keys import CONFIG_KEYS, value
from configs.load import load_config
from tests.helpers import FIXTURES, REPO_ROOT

ORIGINAL = json.loads((FIXTURES / "original_configs.json").read_text())["configs"]
PATH_KEYS = {"video_root", "ann_root", "pretrained", "train_file"}


def expected_values(name: str) -> dict:
    original = ORIGINAL[name]
    return {**original["yaml"], **original["set_by_the_scripts"]}


def test_every_published_config_is_pinned():
    published = {path.stem for path in (REPO_ROOT / "configs").glob("*.yaml")}
    assert published == set(ORIGINAL)


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_published_config_equals_the_original_key_by_key(name):
    config = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    expected = expected_values(name)
    different = {key: (value(config, key), want) for key, want in expected.items() if value(config, key) != want}
    assert not different, f"{name}: (ours, original's) {different}"
    # Nothing beyond the original's keys, so no published value is this project's own choice.
    assert set(config) - PATH_KEYS <= set(expected), set(config) - PATH_KEYS - set(expected)


def test_the_pins_name_only_known_keys():
    for name in ORIGINAL:
        assert set(expected_values(name)) <= set(CONFIG_KEYS), name
