"""YAML with line numbers: `read_yaml` is yaml.safe_load whose mappings, sequences and strings remember
the line they were written on (`line_of`, `key_line`), with bounded size and nesting, and every
problem raised as a CampaignError naming the file and the line."""
from __future__ import annotations

from typing import Any

import yaml

from factory.errors import CampaignError

MAX_FILE_BYTES = 4 * 1024 * 1024        # the campaign YAML
MAX_YAML_DEPTH = 64          # nesting of YAML mappings/sequences


class _Str(str):
    line: int | None = None


class _Map(dict):
    line: int | None = None
    key_lines: dict


class _List(list):
    line: int | None = None
    item_lines: list


class _Loader(yaml.SafeLoader):
    """yaml.safe_load semantics; mappings, sequences and strings remember their line.

    Pure Python on purpose (libyaml's composer recurses in C); nesting depth is bounded while
    composing, so a 10,000-deep document fails after MAX_YAML_DEPTH levels, not in a stack overflow."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise CampaignError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels", self.name,
                                    self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_str(loader, node):
    s = _Str(loader.construct_scalar(node))
    s.line = node.start_mark.line + 1
    return s


def _construct_seq(loader, node):
    out = _List()
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    yield out
    out.extend(loader.construct_object(n, deep=True) for n in node.value)


def _construct_map(loader, node):
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    yield out
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise CampaignError("mapping keys must be plain values", loader.name, line) from None
        if key in out:
            raise CampaignError(f"duplicate key {str(key)!r} (first on line {out.key_lines[key]})",
                                loader.name, line)
        out.key_lines[key] = line
        out[key] = loader.construct_object(value_node, deep=True)


_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def line_of(obj, default=None):
    """The line a value read by `read_yaml` was written on (or `default`)."""
    return getattr(obj, "line", None) or default


def key_line(mapping, key, default=None):
    """The line of `key` in a mapping read by `read_yaml` (else the mapping's own line, or `default`)."""
    return getattr(mapping, "key_lines", {}).get(key) or line_of(mapping, default)


def read_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with line numbers and bounded size and depth (no recursion blow-up)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise CampaignError(f"file larger than {MAX_FILE_BYTES} bytes", source)
    try:
        loader = _Loader(text)
        loader.name = source
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except CampaignError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(str(x) for x in (e.context, e.problem) if x) or str(e)
        raise CampaignError(f"malformed YAML: {msg}", source, line) from None
    except yaml.YAMLError as e:
        raise CampaignError(f"malformed YAML: {e}", source) from None
    except RecursionError:
        raise CampaignError("malformed YAML: nested too deeply", source) from None

