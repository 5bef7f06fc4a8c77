"""Token-reduction rules: which tokens of a block combine. One module per rule; base.py is the
interface and its conventions. `merge_rule` in a config names a rule for both axes, or one per
axis as `{time: NAME, space: NAME}`."""
from models.rules.adjacent import Adjacent
from models.rules.base import MergeContext, Rule
from models.rules.none import NoMerge
from models.rules.pitome import PiToMe
from models.rules.pool import Pool
from models.rules.random_merge import RandomMerge
from models.rules.testa import Testa
from models.rules.tome import ToMe
from models.rules.vid_tldr import VidTLDR

RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Testa(), ToMe(), VidTLDR(), PiToMe(), Adjacent(), Pool(), RandomMerge(), NoMerge())}
AXES = ("time", "space")


def resolve_rules(merge_rule) -> dict[str, Rule]:
    """The rule of each axis from a `merge_rule` value: a name (that rule on the axes it reduces,
    `none` on the others) or a mapping {time: NAME, space: NAME} (a missing axis is `none`)."""
    if isinstance(merge_rule, str):
        rule = rule_named(merge_rule)
        return {axis: rule if axis in rule.axes else RULES["none"] for axis in AXES}
    if not isinstance(merge_rule, dict) or set(merge_rule) - set(AXES):
        raise ValueError(f"merge_rule must be a rule name or a mapping with keys {AXES}, got {merge_rule!r}")
    return {axis: rule_named(merge_rule.get(axis, "none")) for axis in AXES}


def rule_named(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown merge rule {name!r}; the rules are {', '.join(RULES)}")
    return RULES[name]


__all__ = ["AXES", "MergeContext", "RULES", "Rule", "resolve_rules", "rule_named"]
