"""Whether a JSON schema's `$ref` recursion ends: refs no finite JSON value can satisfy.

llguidance compiles a recursive schema to a recursive grammar, and that is fine while the
recursion can stop (a tree whose `children` may be empty). When it cannot - `{"$ref": "#"}`,
two definitions referring to each other, a required property or `minItems` leading back -
the grammar allows no complete value: the matcher fails on its first step, or follows the
forced `{"a": {"a": ...` until it exceeds its item limit, mid-generation. So such schemas
are refused up front.

The test is the classic "productive symbols" one of grammars, in linear time: each schema
node becomes an AND (all its constraints: `$ref`, `allOf`, its type's needs) or an OR
(`anyOf`, `oneOf`, the allowed types) of the nodes below it; a node is productive once all
(AND) or any (OR) of its children are; a `$ref` is productive when its target is. It reads
only what forces nesting (required properties, the first `minItems` items) and assumes
every other keyword can be met: it refuses recursion that cannot end, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from levante.errors import RequestError

SCALAR_TYPES = frozenset({"string", "number", "integer", "boolean", "null"})
Part = bool | int  # a constant, or the index of a node in _Graph.nodes


@dataclass
class _Node:
    """All (`is_and`) or any of `children` must be productive for this node to be."""

    is_and: bool
    children: list[int]
    parents: list[int] = field(default_factory=list)


def check_recursion_ends(schema: dict[str, Any], *, param: str, what: str) -> None:
    """RequestError naming a `$ref` of `schema` that no finite JSON value satisfies."""
    graph = _Graph(schema)
    root = graph.compile(schema)
    for ref in _all_refs(schema):  # an optional branch may still be taken: check its refs
        graph.ref(ref)
    while graph.pending:
        ref, target = graph.pending.pop()
        graph.link(ref, graph.compile(target))
    productive = graph.productive()
    stuck = [ref for ref, index in graph.ref_nodes.items() if not productive[index]]
    if stuck:
        raise RequestError(f"{what} recurses without end: no finite JSON value satisfies "
                           f"$ref {stuck[0]!r} (every branch leads back into it through $ref, "
                           "a required property, minItems or allOf); give the recursion a way "
                           "to stop", param=param)
    if root is False or (not isinstance(root, bool) and not productive[root]):
        raise RequestError(f"{what} admits no JSON value (a required property or item has the "
                           "schema false)", param=param)


class _Graph:
    """The AND/OR nodes of one schema; `$ref` targets are compiled once each."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.nodes: list[_Node] = []
        self.ref_nodes: dict[str, int] = {}
        self.seeds: list[int] = []  # ref nodes whose target is met by a plain value
        self.pending: list[tuple[str, Any]] = []

    def compile(self, schema: Any) -> Part:
        """The part for one schema node (recursing through its subschemas, not its refs)."""
        if isinstance(schema, bool) or not isinstance(schema, dict):
            return schema is not False
        parts: list[Part] = []
        if isinstance(schema.get("$ref"), str):
            parts.append(self.ref(schema["$ref"]))
        parts += [self.compile(s) for s in _schemas(schema.get("allOf"))]
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                parts.append(self._node(False, [self.compile(s) for s in _schemas(schema[key])]))
        if "const" not in schema and "enum" not in schema:
            parts.append(self._type_part(schema))
        return self._node(True, parts)

    def _type_part(self, schema: dict[str, Any]) -> Part:
        """Any allowed type whose needs can be met: scalars always, objects their required
        properties, arrays their first `minItems` items."""
        types = schema.get("type")
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or SCALAR_TYPES.intersection(types):
            return True
        options: list[Part] = []
        if "object" in types:
            properties = schema.get("properties")
            properties = properties if isinstance(properties, dict) else {}
            required = schema.get("required")
            names = [n for n in required if n in properties] if isinstance(required, list) else []
            options.append(self._node(True, [self.compile(properties[n]) for n in names]))
        if "array" in types:
            options.append(self._node(True, [self.compile(s) for s in _first_items(schema)]))
        return self._node(False, options)

    def _node(self, is_and: bool, parts: list[Part]) -> Part:
        """AND/OR of `parts`, folding constants: AND() is True, OR() is False."""
        constants = {p for p in parts if isinstance(p, bool)}
        if (not is_and) in constants:
            return not is_and
        children = [p for p in parts if not isinstance(p, bool)]
        if len(children) <= 1:
            return children[0] if children else is_and
        self.nodes.append(_Node(is_and, children))
        return len(self.nodes) - 1

    def ref(self, ref: str) -> Part:
        """The node of a `$ref` (its target queued for compiling), True if not local."""
        if ref not in self.ref_nodes:
            target = _resolve(self.root, ref)
            if target is None:  # not a local ref: llguidance accepts or refuses it
                return True
            self.nodes.append(_Node(False, []))
            self.ref_nodes[ref] = len(self.nodes) - 1
            self.pending.append((ref, target))
        return self.ref_nodes[ref]

    def link(self, ref: str, target: Part) -> None:
        """The ref's node is productive when its target's part is."""
        index = self.ref_nodes[ref]
        if target is True:
            self.seeds.append(index)
        elif target is not False:
            self.nodes[index].children.append(target)

    def productive(self) -> list[bool]:
        """Which nodes have a finite value: from the seeds up, each node visited once."""
        missing = [len(n.children) if n.is_and else 1 for n in self.nodes]
        for index, node in enumerate(self.nodes):
            for child in node.children:
                self.nodes[child].parents.append(index)
        done = [False] * len(self.nodes)
        queue = list(self.seeds)
        while queue:
            index = queue.pop()
            if done[index]:
                continue
            done[index] = True
            for parent in self.nodes[index].parents:
                missing[parent] -= 1
                if missing[parent] == 0 or not self.nodes[parent].is_and:
                    queue.append(parent)
        return done


def _all_refs(schema: Any) -> list[str]:
    """Every `$ref` string anywhere in `schema`, walked without recursion."""
    refs, stack = [], [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return refs


def _schemas(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _first_items(schema: dict[str, Any]) -> list[Any]:
    """The schemas of the items an array must have (its first `minItems`)."""
    min_items = schema.get("minItems")
    count = min_items if isinstance(min_items, int) and min_items > 0 else 0
    prefix = _schemas(schema.get("prefixItems"))
    rest = schema.get("items", True)
    return prefix[:count] + ([rest] if count > len(prefix) else [])


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """The subschema a local ref ("#", "#/$defs/node") names, or None for any other ref."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node: Any = root
    for token in ref[2:].split("/") if ref != "#" else []:
        key = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node
