"""The config as text for people, rendered from the settings' own definitions (services/common/config.py).

* ``default_yaml(data_dir)``: the commented default config ``make up`` writes on first start:
  every setting with its default value, its description and its environment override.
* ``markdown()``: docs/config.md, the table of every setting (type, default, environment,
  description) and the renamed ones. ``make gen`` (protos/gen.py) writes it and ``make test``
  checks it for drift.

``python -m services.common.config_text --markdown`` prints the table, ``--yaml DIR`` the
default config for the data dir DIR.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from services.common.config import RENAMED, Config, build_config, dump_config
from services.common.setting import Field, fields_of, walk

# A list or mapping longer than this (as JSON) is written one entry per line.
FLOW_WIDTH = 72
COMMENT_WIDTH = 100
# Data-dir-derived defaults in docs/config.md: the data dir shown as this word.
DATA_WORD = "DATA"

YAML_HEADER = """\
# gridstor gateway configuration, written by the launcher (`make up`) on first start.
# Every setting is shown with its default and what it means (docs/config.md has the same
# table). Edit, then restart the launcher: a wrong value stops the start with a message
# naming the setting. Sizes take units (100MB, 4MiB); seconds may have decimals. A
# GRIDSTOR_* variable named beside a setting overrides this file. The gateway keys
# (gateway.key, master.key) live in data_dir, 0600, and never in this file.
"""


def _scalar(value: Any) -> str:
    """A YAML scalar. JSON quoting is valid YAML and keeps paths with odd characters intact; floats as YAML has them."""
    if isinstance(value, float):
        return yaml.safe_dump(value).splitlines()[0]
    return json.dumps(value, ensure_ascii=False)


def _flow(value: Any) -> str:
    """A value on one line: a scalar, or a JSON flow list / mapping (valid YAML)."""
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    return _scalar(value)


def _yaml_value(key: str, value: Any, indent: str) -> list[str]:
    """``key: value`` lines; a long list or mapping one entry per line."""
    flow = _flow(value)
    if not isinstance(value, list | dict) or not value or len(flow) <= FLOW_WIDTH:
        return [f"{indent}{key}: {flow}"]
    if isinstance(value, list):
        return [f"{indent}{key}:", *(f"{indent}  - {_flow(v)}" for v in value)]
    return [f"{indent}{key}:", *(f"{indent}  {_scalar(k)}: {_flow(v)}" for k, v in value.items())]


def _comment(text: str, indent: str) -> list[str]:
    """``text`` as comment lines of at most COMMENT_WIDTH characters."""
    prefix = f"{indent}# "
    return textwrap.wrap(text, COMMENT_WIDTH, initial_indent=prefix, subsequent_indent=prefix, break_on_hyphens=False)


def _help(f: Field) -> str:
    return f"{f.setting.help} ({f.setting.env} overrides it)" if f.setting.env else f.setting.help


def _yaml_lines(cls: type[Any], values: dict[str, Any], indent: str) -> Iterator[str]:
    for f in fields_of(cls):
        value = values[f.key]
        if f.section is not None:
            yield ""
            yield from _comment(f.setting.help, indent)
            yield f"{indent}{f.key}:"
            yield from _yaml_lines(f.section, value, indent + "  ")
        else:
            if not indent:
                yield ""
            yield from _comment(_help(f), indent)
            yield from _yaml_value(f.key, value, indent)


def default_yaml(data_dir: Path) -> str:
    """The commented default config for ``data_dir``: every setting, its default and what it means."""
    cfg = build_config({}, data_dir=data_dir.absolute(), env={})
    return YAML_HEADER + "\n".join(_yaml_lines(Config, dump_config(cfg), "")) + "\n"


# -- docs/config.md -------------------------------------------------------------------------------------

MD_HEADER = """\
# Configuration settings

<!-- Generated from services/common/config.py (and EngineConfig in services/common/engine.py) by
`python -m services.common.config_text --markdown`; `make gen` rewrites this file and `make test`
fails when it is out of date. Edit the settings' definitions, not this file. -->

The gateway reads one YAML file (`--config FILE`; `make up` writes a commented default to
`DATA/gridstor.yaml` on first start, with the same descriptions as below). Every setting
has a default that works on one machine; a wrong or unknown setting stops the start with a
message naming it, e.g. `config: engine.k: must be an integer >= 1`.

- **Sizes** take an integer of bytes or units: `100MB`, `1.5G` (powers of 1000), `4MiB` (powers of 1024).
- **Env**: a `GRIDSTOR_*` variable that overrides the setting; the environment wins over the
  file (and over `--data` for `data_dir`); an empty variable counts as unset.
- `DATA` stands for the data dir in derived defaults.
"""


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_default(f: Field) -> str:
    """The default as docs show it: data-dir-derived ones with DATA for the data dir, long lists shortened."""
    spec = f.setting
    value = spec.check.dump(spec.derive(Path(DATA_WORD)) if spec.derive is not None else f.default)
    if isinstance(value, list) and len(value) > 3:
        return f"`{_flow(value[0])}` … `{_flow(value[-1])}` ({len(value)} entries)"
    if isinstance(value, dict) and len(_flow(value)) > 60:
        return "<br>".join(f"`{k}: {_flow(v)}`" for k, v in value.items())
    return f"`{_md(_flow(value))}`"


def _md_table(cls: type[Any], prefix: str) -> list[str]:
    lines = ["| Key | Type | Default | Env | Description |", "| --- | --- | --- | --- | --- |"]
    for f in fields_of(cls):
        if f.section is not None:
            lines.append(f"| `{prefix}{f.key}` | section | see below | | {_md(f.setting.help)} |")
            continue
        env = f"`{f.setting.env}`" if f.setting.env else ""
        row = (f"`{prefix}{f.key}`", _md(f.setting.check.kind), _md_default(f), env, _md(f.setting.help))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown() -> str:
    """docs/config.md: every setting with its type, default, environment override and description."""
    out = [MD_HEADER, "## Top level", "", *_md_table(Config, "")]
    for path, f in walk(Config):
        if f.section is None:
            continue
        doc = inspect.getdoc(f.section) or ""
        head, _, rest = doc.partition("\n")
        out += ["", f"## `{path}:`", "", _md(head)]
        if rest.strip():
            out += ["", " ".join(rest.split())]
        out += ["", *_md_table(f.section, f"{path}.")]
    out += [
        "",
        "## Renamed settings",
        "",
        "Read for one more release with a warning naming the new key; a config that sets both is refused.",
        "",
        "| Old name | New name |",
        "| --- | --- |",
        *(f"| `{old}` | `{section}.{key}` |" for old, (section, key) in RENAMED.items()),
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.config_text", description="Print the settings table or the default config."
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="docs/config.md")
    group.add_argument("--yaml", metavar="DIR", type=Path, help="the default config for the data dir DIR")
    args = parser.parse_args(argv)
    sys.stdout.write(markdown() if args.markdown else default_yaml(args.yaml))
    return 0


if __name__ == "__main__":
    sys.exit(main())
