"""Hints for a command line Hydra refused: where a key lives (``loss.alpha`` needs
``loss=kd``), a near miss of a key (``loss.temprature``) or of a group's option
(``model=resnet9``), printed by run.py under its one-line error."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import yaml


def _option_hint(arg: str, conf_dir: Path) -> str | None:
    """For ``group=option`` naming no option of the group: the near misses and the list."""
    name, eq, value = arg.lstrip("+~").partition("=")
    group = name.split("@")[0]
    if not eq or "." in group or not value or not (conf_dir / group).is_dir() or "," in value:
        return None
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    if value in options or value == "null":
        return None
    ratio = {option: difflib.SequenceMatcher(None, value, option).ratio() for option in options}
    close = sorted((o for o in options if ratio[o] >= 0.6), key=lambda o: (-round(ratio[o], 6), len(o), o))[:3]
    near = f"did you mean {' or '.join(close)}? " if close else ""
    return f"{group} has no option {value!r}: {near}its options: {', '.join(options)}"


def _option_keys(path: Path) -> set[str]:
    """The top-level keys an option's YAML file sets (none for an unreadable file)."""
    try:
        node = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    return {str(k) for k in node if k != "defaults"} if isinstance(node, dict) else set()


def override_hints(args: list[str], conf_dir: Path) -> list[str]:
    """Hints for overrides Hydra refused: a key that belongs to another option of its
    group (``loss.alpha`` needs ``loss=kd``), or a near miss (``loss.temprature``)."""

    chosen: dict[str, str] = {}
    try:  # the primary config's defaults: model=student, trainer=default, ...
        for entry in yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", []):
            if isinstance(entry, dict):
                for name, value in entry.items():
                    if isinstance(value, str) and "@" not in name and " " not in name:
                        chosen[name] = value
    except (OSError, AttributeError, yaml.YAMLError):
        pass
    for arg in args:
        name, _, value = arg.lstrip("+~").partition("=")
        if value and "." not in name and (conf_dir / name).is_dir():
            chosen[name] = value
    hints = [hint for arg in args if (hint := _option_hint(arg, conf_dir))]
    for arg in args:
        key, eq, _ = arg.lstrip("+~").partition("=")
        group, dot, rest = key.partition(".")
        if not (eq and dot and (conf_dir / group).is_dir()):
            continue
        field = rest.split(".")[0]
        options = {p.stem: _option_keys(p) for p in sorted((conf_dir / group).glob("*.yaml"))}
        if chosen.get(group) in options and field in options[chosen[group]]:
            continue
        holders = sorted((name for name, keys in options.items() if field in keys), key=lambda n: (len(n), n))
        if holders:
            more = f" (also {', '.join(f'{group}={h}' for h in holders[1:])})" if len(holders) > 1 else ""
            hints.append(f"{key} is a key of {group}={holders[0]}{more}: add {group}={holders[0]} to the command")
            continue
        every_key = sorted({k for keys in options.values() for k in keys})
        close = difflib.get_close_matches(field, every_key, n=1)
        if close:
            hints.append(f"{group} has no key {field!r}: did you mean {group}.{close[0]}?")
    return hints


SWEEP_FUNCTIONS = ("choice", "range", "interval", "tag", "glob", "shuffle", "sort", "int", "float", "str", "bool")
SWEEP_FORMS = "a,b,c | choice(a,b) | range(start,stop[,step]) | interval(low,high) | tag(log,interval(low,high))"
_PARSE_ERROR = re.compile(r"Error when parsing index: \d+, string: (.*?) out of \[")


def sweep_syntax_error(message: str) -> str | None:
    """Hydra's override parse error (``Error when parsing index: 0, string: ...``) as one
    line naming the bad override, what is wrong in it, and the accepted forms."""
    found = _PARSE_ERROR.search(message)
    if found is None:
        return None
    override = found.group(1)
    _, _, value = override.partition("=")
    wrong = "it is not a value Hydra can read"
    for name in re.findall(r"([A-Za-z_]\w*)\s*\(", value):
        if name not in SWEEP_FUNCTIONS:
            close = difflib.get_close_matches(name, SWEEP_FUNCTIONS, n=1)
            wrong = f"{name}(...) is no sweep function" + (f" (did you mean {close[0]}?)" if close else "")
            break
    else:
        for opening, closing in ("()", "[]", "{}"):
            if value.count(opening) != value.count(closing):
                wrong = f"its {opening} and {closing} do not pair up"
                break
        else:
            if value.count("'") % 2 or value.count('"') % 2:
                wrong = "a quote is not closed (quote the whole override for your shell: 'key=value')"
    return f"cannot read the override {override}: {wrong}; accepted forms: {SWEEP_FORMS}"
