"""Reading a YAML config and `key=value` overrides; the keys themselves are described in configs/keys.py.

Every value is checked here, before any data or model work: its type and rules and the keys
that must divide others; keys the run never reads are said in one `warning:` line. (A `testa_r`
schedule the encoder cuts, pads or clamps is said when the encoder is built: models/schedule.py.)
"""
import io
import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from configs.keys import CONFIG_KEYS, ConfigError, check, check_values, task_of, unknown_key_message, unread_keys, value
from runtime.distributed import is_main_process

RUN_NAMES = {"pretrain": "pre-training", "retrieval": "retrieval", "qa": "video QA"}


def parse_override(text: str) -> tuple[str, object]:
    """Split `key=value` into the key and the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else ""
    except YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error.problem})") from None
    return key.strip(), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Set each `key=value` in `config`; unknown keys fail."""
    for text in overrides:
        key, value = parse_override(text)
        if key not in CONFIG_KEYS:
            raise ConfigError(unknown_key_message(key, f"override {text!r}"))
        config[key] = value
    return config


def load_config(path, overrides: list[str] = ()) -> dict:
    """Read a YAML config (safe loader), apply `key=value` overrides and check every value; warn
    (rank 0) about keys the config's run does not read and about a testa_r the encoder adjusts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = YAML(typ="safe").load(path.read_text())
    except YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a mapping of key: value, got {type(config).__name__}")
    check(config, str(path))
    config = apply_overrides(config, list(overrides))
    check(config, "the overrides")
    set_by = {parse_override(text)[0]: f"override {text!r}" for text in overrides}
    check_values_and_warn(config, lambda name: set_by.get(name, str(path)))
    return config


def check_values_and_warn(config: dict, where_of) -> None:
    """Every value within its key's rules (configs/keys.py: check_values; `where_of(name)` says
    where a key was set), then one `warning:` line (rank 0) for each thing the run will not do
    as the config says. For a config that `check` has passed."""
    check_values(config, where_of)
    for message in config_warnings(config):
        if is_main_process():
            print(f"warning: {message}", file=sys.stderr)


def config_warnings(config: dict) -> list[str]:
    """What the run will not do as the config says, one line each."""
    messages = []
    task = task_of(config)
    unread = unread_keys(config, task) if task else []
    if unread:
        names = ", ".join(f"{name!r} ({CONFIG_KEYS[name].help.split(';')[0]})" for name in unread)
        messages.append(f"a {RUN_NAMES[task]} run does not read {names}; "
                        f"{'it is' if len(unread) == 1 else 'they are'} ignored")
    return messages


def save_config(config: dict, output_dir, provenance: dict | None = None) -> Path:
    """Write the resolved config to output_dir/config.yaml (main rank only), with `provenance`
    (runtime.provenance) as YAML comment lines on top: the file loads as the config alone, and
    the comments, their `# ` taken off, load as {'provenance': ...}."""
    target = Path(output_dir) / "config.yaml"
    if is_main_process():
        stream = io.StringIO()
        if provenance is not None:
            record, block_style = io.StringIO(), YAML(typ="safe")
            block_style.default_flow_style = False
            block_style.dump({"provenance": provenance}, record)
            first, *rest = record.getvalue().splitlines()
            stream.write(f"# {first}  # the run that wrote this file (comments: no config keys)\n")
            stream.writelines(f"# {line}\n" for line in rest)
        YAML(typ="safe").dump(config, stream)
        target.write_text(stream.getvalue())
    return target
