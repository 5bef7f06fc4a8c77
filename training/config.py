"""Reading a YAML config and `key=value` overrides; the keys themselves are described in configs/keys.py."""
import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from configs.keys import CONFIG_KEYS, ConfigError, check, unknown_key_message
from training.distributed import is_main_process


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
    """Read a YAML config (safe loader), check its keys and types, and apply `key=value` overrides."""
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
    return config


def save_config(config: dict, output_dir) -> Path:
    """Write the resolved config to output_dir/config.yaml (main rank only)."""
    target = Path(output_dir) / "config.yaml"
    if is_main_process():
        stream = io.StringIO()
        YAML(typ="safe").dump(config, stream)
        target.write_text(stream.getvalue())
    return target
