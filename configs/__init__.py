"""The published YAML configs, and `keys.py`: the description of every key they may hold."""
