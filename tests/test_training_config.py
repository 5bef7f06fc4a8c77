"""Config loading, overrides, the argument parser and the one-line CLI error wrapper."""
import pytest

from configs.keys import ConfigError
from configs.load import load_config, save_config
from runtime.errors import UserError, run_cli
from training.cli import build_arg_parser, setup_run


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_config_parses_yaml_and_applies_overrides(tmp_path):
    path = write(tmp_path, "init_lr: 1e-5\ntesta_r: [4, 8]\nmerging_type: frame&patch\nk_test: 128\n")
    config = load_config(path, ["init_lr=5e-6", "testa_r=[1,12]", "token_merging=True",
                                      "video_root=/data/videos"])
    assert config == {"init_lr": 5e-6, "testa_r": [1, 12], "merging_type": "frame&patch",
                      "k_test": 128, "token_merging": True, "video_root": "/data/videos"}


@pytest.mark.parametrize("text, overrides, expected", [
    ("image_size: 224px\n", [], "'image_size' in .* must be int, got '224px'"),
    ("k_test: 4\n", ["k_test=[1, 2]"], "'k_test' in the overrides must be int"),
    ("token_merging: 1\n", [], "'token_merging' .* must be bool"),
    ("dataset: {name: msrvtt}\n", [], "'dataset' .* must be str")])
def test_values_of_the_wrong_type_are_errors_naming_the_key(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), overrides)


def test_every_published_config_key_is_described_with_its_type():
    from tests.helpers import REPO_ROOT
    for path in sorted((REPO_ROOT / "configs").rglob("*.yaml")):
        load_config(path)  # raises on an unknown key or a value of the wrong type


def test_defaults_come_from_the_key_description():
    from configs.keys import CONFIG_KEYS, value
    assert value({}, "embed_dim") == CONFIG_KEYS["embed_dim"].default == 256
    with pytest.raises(ConfigError, match="config is missing 'k_test'.*needed by retrieval"):
        value({}, "k_test", "retrieval")
    # The published `max_words` sets both of its clearer aliases unless they are given.
    assert value({"max_words": 64}, "caption_max_words") == value({"max_words": 64}, "text_max_tokens") == 64
    assert (value({}, "caption_max_words"), value({}, "text_max_tokens")) == (30, 35)
    assert value({"max_words": 64, "text_max_tokens": 40}, "text_max_tokens") == 40


def test_readme_key_table_is_the_one_derived_from_the_description():
    from configs.keys import markdown_table
    from tests.helpers import REPO_ROOT
    assert markdown_table() in (REPO_ROOT / "docs" / "configs.md").read_text()


@pytest.mark.parametrize("text, where", [("init_lrr: 1e-5\n", []), ("init_lr: 1e-5\n", ["int_lr=1"])])
def test_unknown_key_is_an_error_naming_close_matches(tmp_path, text, where):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), where)
    message = str(error.value)
    assert "unknown config key" in message and "did you mean 'init_lr'" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("a: [1,\n", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping")])
def test_malformed_config_files_are_config_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_missing_config_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, "k_test: 4\n"), ["k_test"])


def test_save_config_round_trips(tmp_path):
    config = {"init_lr": 1e-5, "testa_r": [1, 12], "merging_type": "frame&patch"}
    assert load_config(save_config(config, tmp_path)) == config


def parser():
    parser = build_arg_parser("test")
    parser.add_argument("--sep_img", "--sep_image", action="store_true", help="separate image loader")
    return parser


def test_parser_defaults_overrides_and_aliases():
    args = parser().parse_args(["--config", "c.yaml", "--output_dir", "out", "--sep_image",
                                "--options", "init_lr=1e-5", "--", "k_test=4"])
    # Unset flags leave the config's values (mixed_precision_method, accumulation_steps, ...).
    assert args.mixed_precision_method is None and args.accumulation_steps is None
    assert args.max_grad_norm is None and args.seed is None and args.sep_img
    assert args.options == ["init_lr=1e-5"] and args.overrides == ["k_test=4"]


@pytest.mark.parametrize("argv", [["--unknown_flag"], ["--mixed_precision_method", "fp8"],
                                  ["--accumulation_steps", "0"]])
def test_parser_rejects_unknown_flags_and_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["--config", "c.yaml", "--output_dir", "out", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_every_flag_has_help():
    for action in parser()._actions:
        assert action.help, f"{action.dest} has no help text"


def test_setup_run_resolves_flags_into_config(tmp_path):
    config_path = write(tmp_path, "seed: 7\nnum_workers: 4\nk_test: 16\n")
    args = parser().parse_args(["--config", str(config_path), "--output_dir", str(tmp_path / "out"),
                                "--device", "cpu", "--num_workers", "0", "--low_resource_eval",
                                "--mixed_precision_method", "apex", "k_test=8"])
    run = setup_run(args)
    assert run.seed == 7 and run.precision.dtype is not None
    assert run.config == {"seed": 7, "num_workers": 0, "k_test": 8, "low_resource_eval": True,
                          "mixed_precision_method": "apex", "accumulation_steps": 1, "max_grad_norm": None}
    assert load_config(tmp_path / "out" / "config.yaml") == run.config


@pytest.mark.parametrize("error, expected", [
    (ConfigError("unknown config key 'x'"), "error: unknown config key 'x'\n"),
    (FileNotFoundError(2, "No such file or directory", "/no/ann"), "error: file not found: /no/ann\n"),
    (UserError("checkpoint not found: a.pth"), "error: checkpoint not found: a.pth\n")])
def test_run_cli_prints_one_line_and_exits_nonzero(error, expected, capsys):
    def main():
        raise error
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == expected and "Traceback" not in captured.out


def test_run_cli_keeps_tracebacks_for_bugs():
    def main():
        raise KeyError("bug")
    with pytest.raises(KeyError):
        run_cli(main)
