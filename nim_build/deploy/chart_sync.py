"""The Helm chart's `engine` values, derived from the one declaration of the build options (nim_build/options.py).

    python -m nim_build.deploy.chart_sync [CHART_DIR] [--check]

rewrites, in the chart (default helm/nim-llm), the four places that describe the engine values: the `engine:`
block of values.yaml (every portable option, its default and its `## @param` line), the `engine` section of
values.schema.json (types, choices, ranges), the README's `engine.*` parameter rows, and
templates/_engine.tpl, which turns the values into the init container's `nim_build cache-engine` flags.
With --check it changes nothing and exits 1 when any of them is out of date (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from nim_build import options

GENERATED = "Generated from nim_build/options.py by `python -m nim_build.deploy.chart_sync`: edit there, not here."
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _fields():
    return options.fields(portable=True)


def _type(f) -> tuple[str, bool]:
    kind, nullable = options.value_type(f)
    return _JSON_TYPES[kind], nullable


def _help(f) -> str:
    text = f.metadata["help"]
    if f.metadata["chart_choices"]:
        text += f" One of: {', '.join(map(str, f.metadata['chart_choices']))}."
    return text


def values_block() -> str:
    lines = [
        "engine:",
        f"  ## {GENERATED}",
        "  ## Every portable option of `nim_build engine`; the init container passes them to `nim_build cache-engine`.",
    ]
    for f in _fields():
        kind, nullable = _type(f)
        lines.append(f"  ## @param engine.{options.chart_key(f)} [{kind}{'|null' if nullable else ''}] {_help(f)}")
        lines.append("  " + yaml.safe_dump({options.chart_key(f): f.default}, default_flow_style=False).strip())
    return "\n".join(lines) + "\n"


def schema_section() -> dict:
    props = {}
    for f in _fields():
        kind, nullable = _type(f)
        node: dict = {"type": [kind, "null"] if nullable else kind, "description": f.metadata["help"]}
        if f.metadata["chart_choices"]:
            node["enum"] = list(f.metadata["chart_choices"])
        for key, schema_key in (("min", "minimum"), ("max", "maximum")):
            if f.metadata[key] is not None:
                node[schema_key] = f.metadata[key]
        props[options.chart_key(f)] = node
    # helm drops keys whose value is null, so only the options that cannot be null are required
    required = [options.chart_key(f) for f in _fields() if not _type(f)[1]]
    return {
        "type": "object",
        "additionalProperties": False,
        "description": GENERATED,
        "properties": props,
        "required": required,
    }


def readme_rows() -> list[str]:
    rows = []
    for f in _fields():
        kind, nullable = _type(f)
        rows.append(
            f"| `engine.{options.chart_key(f)}` | {kind}{' or null' if nullable else ''} | {_help(f)} | "
            f"`{json.dumps(f.default)}` |"
        )
    return rows


def engine_template() -> str:
    flags = "".join(f'\n  "{options.chart_key(f)}" "{options.flag(f)}"' for f in _fields())
    return f"""{{{{/*
{GENERATED}
nim-llm.engineArgs: the engine values as `nim_build cache-engine` flags, one YAML list item per word: booleans as
--flag / --no-flag, numbers as JSON writes them (never 1e+06), null values left out.
*/}}}}
{{{{- define "nim-llm.engineArgs" -}}}}
{{{{- $flags := dict{flags} -}}}}
{{{{- range $key, $value := .Values.engine }}}}
{{{{- $flag := get $flags $key }}}}
{{{{- if not $flag }}}}
{{{{- fail (printf "engine.%s is not a build option of this chart's nim_build" $key) }}}}
{{{{- end }}}}
{{{{- if kindIs "bool" $value }}}}
- {{{{ ternary $flag (printf "--no-%s" (trimPrefix "--" $flag)) $value | quote }}}}
{{{{- else if not (kindIs "invalid" $value) }}}}
- {{{{ $flag | quote }}}}
- {{{{ ternary $value (toJson $value) (kindIs "string" $value) | quote }}}}
{{{{- end }}}}
{{{{- end }}}}
{{{{- end -}}}}
"""


def synced(chart: Path) -> dict[Path, str]:
    """Each generated file's content as it should be."""
    values_path, schema_path = chart / "values.yaml", chart / "values.schema.json"
    readme_path, tpl_path = chart / "README.md", chart / "templates" / "_engine.tpl"

    values = values_path.read_text()
    match = re.search(r"^engine:\n(?: .*\n)*", values, re.M)  # the block: its indented lines
    if match is None:
        raise ValueError(f"{values_path} has no top-level `engine:` block")
    values = values[: match.start()] + values_block() + values[match.end() :]

    schema = json.loads(schema_path.read_text())
    schema["properties"]["engine"] = schema_section()
    schema_text = json.dumps(schema, indent=2) + "\n"

    readme = readme_path.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(readme) if line.startswith("| `engine.")]
    if not at or at != list(range(at[0], at[-1] + 1)):
        raise ValueError(f"{readme_path} needs its `engine.*` parameter rows together, in one table")
    readme = readme[: at[0]] + [r + "\n" for r in readme_rows()] + readme[at[-1] + 1 :]
    return {values_path: values, schema_path: schema_text, readme_path: "".join(readme), tpl_path: engine_template()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nim_build.deploy.chart_sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("chart", nargs="?", default="helm/nim-llm", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is out of date")
    args = ap.parse_args(argv)
    stale = [p for p, text in synced(args.chart).items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p} is out of date: run python -m nim_build.deploy.chart_sync", file=sys.stderr)
        return 1 if stale else 0
    for p, text in synced(args.chart).items():
        if p in stale:
            p.write_text(text)
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
