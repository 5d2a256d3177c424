"""`${...}` references inside step fields: `${work_dir}`, `${name}` and `${steps.STEP.KEY}` (an earlier step's output)."""

from __future__ import annotations

import re
from typing import Any, Iterator

REF = re.compile(r"\$\{([^}]*)\}")
STEP_REF = re.compile(r"^steps\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)$")
GLOBAL_NAMES = ("work_dir", "name")


def references(value: Any) -> Iterator[str]:
    """Every reference expression (the text inside `${}`) in a nested value."""
    if isinstance(value, str):
        yield from (m.group(1).strip() for m in REF.finditer(value))
    elif isinstance(value, dict):
        for item in value.values():
            yield from references(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from references(item)


def resolve(value: Any, scope: dict[str, Any], outputs: dict[str, dict[str, Any]], keep_unknown: bool = False) -> Any:
    """`value` with references substituted. A string that is exactly one reference takes the output's type.

    With `keep_unknown`, references to outputs that do not exist yet stay as written (for --dry-run).
    """
    if isinstance(value, dict):
        return {k: resolve(v, scope, outputs, keep_unknown) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, scope, outputs, keep_unknown) for v in value]
    if not isinstance(value, str):
        return value
    whole = REF.fullmatch(value.strip())
    if whole:
        return _lookup(whole.group(1).strip(), scope, outputs, keep_unknown, value)
    return REF.sub(lambda m: str(_lookup(m.group(1).strip(), scope, outputs, keep_unknown, m.group(0))), value)


def _lookup(expr: str, scope: dict[str, Any], outputs: dict[str, dict[str, Any]], keep_unknown: bool, raw: str) -> Any:
    if expr in scope:
        return scope[expr]
    match = STEP_REF.match(expr)
    if match and match.group(2) in outputs.get(match.group(1), {}):
        return outputs[match.group(1)][match.group(2)]
    if keep_unknown:
        return raw
    from dcad.platform.pipeline.errors import PipelineError

    raise PipelineError(f"reference ${{{expr}}} has no value (the step it names has not produced '{expr.rsplit('.', 1)[-1]}')")
