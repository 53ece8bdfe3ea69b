"""Recipe text before it is checked: `--set KEY=VALUE` overrides, merged into the recipe, and the
nesting limit every recipe and value is held to (a deeply nested YAML document is refused before
it is parsed).
"""

from __future__ import annotations

import yaml

from rim_lens.errors import ConfigError, clip

MAX_DEPTH = 16  # nesting levels of a recipe or --set value (the deepest real key is 3 levels down)


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings (value parsed as YAML) to a nested dict."""
    out: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"--set {clip(repr(item))}: expected KEY=VALUE, e.g. train.steps=200")
        if len(parts) > MAX_DEPTH:
            raise ConfigError(f"--set {clip(repr(item))}: {too_deep()}")
        try:
            check_depth(text, f"--set {clip(repr(item))}")
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(
                f"--set {clip(repr(item))}: the value is not valid YAML ({problem}); "
                f"quote it, e.g. {clip(key)}='...'"
            ) from None
        node = out
        *parents, leaf = parts
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"--set {clip(repr(item))}: '{section}' was set to a value by an earlier --set, "
                    "so it has no keys"
                )
        node[leaf] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = (
            merge(merged[k], v)
            if isinstance(v, dict) and isinstance(merged.get(k), dict) and k != "options"
            else v
        )
    return merged


def too_deep() -> str:
    return f"nested deeper than {MAX_DEPTH} levels; a recipe's keys are a few levels deep"


def check_depth(text: str, where: str) -> None:
    """ConfigError if the YAML `text` nests mappings or lists deeper than MAX_DEPTH, found from
    the parser's event stream (which does not recurse), before anything builds the nested value."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{where}:{event.start_mark.line + 1}: {too_deep()}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
