"""Spec text (YAML, and so JSON) parsed within limits: the one parser for every way a spec or
recipe enters (--spec files, --spec-json, --set values, the KFP launcher's spec parameter, recipes).
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import SpecError

# Limits on spec text, checked while parsing (by `validate` too): a spec is a page of settings,
# so these only stop hostile input (a 50,000-deep nesting overflows the parser's recursion; an
# alias bomb expands a few hundred bytes into billions of nodes that validation then walks).
SPEC_MAX_BYTES = 1 << 20
SPEC_MAX_DEPTH = 64
SPEC_MAX_NODES = 100_000  # counted with every alias expanded


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than SPEC_MAX_DEPTH and more than SPEC_MAX_NODES
    nodes once aliases are expanded. Anchors and aliases stay allowed (one dataset ref shared by
    calibration and evaluation is a fair use); what they would expand to is what is counted."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def _count(self, n: int) -> None:
        self._nodes += n
        if self._nodes > SPEC_MAX_NODES:
            raise SpecError(f"more than {SPEC_MAX_NODES} values once YAML aliases are expanded; refused")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None and id(target) not in self._expanded:
                raise SpecError("a YAML alias refers to a node that contains it (a recursive structure); refused")
            if target is not None:
                self._count(self._expanded[id(target)])
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > SPEC_MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise SpecError(f"nested deeper than {SPEC_MAX_DEPTH} levels (at line {line}); refused")
        before = self._nodes
        self._count(1)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._expanded[id(node)] = self._nodes - before
        return node


def load_yaml(text: str, label: str) -> Any:
    """Parse YAML/JSON text within SPEC_MAX_BYTES, SPEC_MAX_DEPTH and SPEC_MAX_NODES."""
    if len(text) > SPEC_MAX_BYTES:
        raise SpecError(f"{label}: more than {SPEC_MAX_BYTES} characters; a spec is at most that long")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except SpecError as e:
        raise SpecError(f"{label}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{label}: not valid YAML/JSON{where}") from None
    except (ValueError, OverflowError) as e:  # a scalar YAML cannot convert: month 13, a 5000-digit int, !!float abc
        raise SpecError(f"{label}: not valid YAML/JSON (a value cannot be read: {str(e)[:100]})") from None
    finally:
        loader.dispose()


def parse_spec_text(text: str, label: str) -> dict[str, Any]:
    data = load_yaml(text, label)  # YAML is a superset of JSON
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{label}: expected a mapping of spec fields, got {type(data).__name__}")
    return data
