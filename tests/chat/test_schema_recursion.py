"""Recursive JSON schemas: a recursion that can stop passes, one that cannot is refused."""

from __future__ import annotations

import pytest

from levante.chat.schema_recursion import check_recursion_ends
from levante.errors import RequestError

NODE = {"type": "object", "properties": {"children": {"type": "array",
                                                      "items": {"$ref": "#/$defs/node"}}}}
ENDLESS = {
    "itself": ({"$ref": "#"}, "'#'"),
    "two definitions in a cycle": ({"$defs": {"a": {"$ref": "#/$defs/b"},
                                              "b": {"$ref": "#/$defs/a"}},
                                    "$ref": "#/$defs/a"}, "'#/$defs/a'"),
    "a required property": ({"type": "object", "properties": {"a": {"$ref": "#"}},
                             "required": ["a"]}, "'#'"),
    "minItems": ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "'#'"),
    "allOf": ({"$defs": {"n": {"allOf": [{"$ref": "#/$defs/n"}]}}, "$ref": "#/$defs/n"},
              "'#/$defs/n'"),
    "an optional branch": ({"type": "object", "properties": {"x": {"$ref": "#/$defs/bad"}},
                            "$defs": {"bad": {"type": "object", "required": ["y"],
                                              "properties": {"y": {"$ref": "#/$defs/bad"}}}}},
                           "'#/$defs/bad'"),
    "a prefix item": ({"type": "array", "prefixItems": [{"$ref": "#"}], "minItems": 1},
                      "'#'"),
}
ENDING = {
    "a tree": {"$defs": {"node": NODE}, "$ref": "#/$defs/node"},
    "a tree whose children are required": {"$defs": {"node": {**NODE, "required": ["children"]}},
                                           "$ref": "#/$defs/node"},
    "a linked list ending in null": {"type": "object", "required": ["v", "next"], "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}},
    "a cycle with a way out": {"$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}}, "$ref": "#/$defs/a"},
    "a scalar type besides object": {"type": ["object", "null"], "required": ["a"],
                                     "properties": {"a": {"$ref": "#"}}},
    "a const in a branch": {"type": "object", "required": ["a"], "properties": {
        "a": {"anyOf": [{"$ref": "#"}, {"const": "leaf"}]}}},
    "a remote ref (left to llguidance)": {"$ref": "https://example.com/schema.json"},
}


@pytest.mark.parametrize("name", ENDLESS)
def test_recursion_that_cannot_end_is_refused_naming_the_ref(name: str) -> None:
    schema, ref = ENDLESS[name]
    with pytest.raises(RequestError) as caught:
        check_recursion_ends(schema, param="response_format", what="the schema")
    assert caught.value.param == "response_format"
    assert f"the schema recurses without end: no finite JSON value satisfies $ref {ref}" in \
        str(caught.value)


@pytest.mark.parametrize("name", ENDING)
def test_recursion_that_can_end_passes(name: str) -> None:
    check_recursion_ends(ENDING[name], param="tools", what="the schema")


def test_a_required_false_property_admits_nothing() -> None:
    schema = {"type": "object", "properties": {"a": False}, "required": ["a"]}
    with pytest.raises(RequestError, match="admits no JSON value"):
        check_recursion_ends(schema, param="tools", what="the schema")


def test_a_long_chain_of_definitions_is_linear() -> None:
    """5000 definitions each requiring the next, the last a plain integer: productive, found
    in one pass from the integer up (a round-by-round fixpoint would take 5000 rounds)."""
    count = 5000
    defs = {f"a{i}": {"type": "object", "required": ["n"],
                      "properties": {"n": {"$ref": f"#/$defs/a{i + 1}"}}} for i in range(count)}
    check_recursion_ends({"$defs": {**defs, f"a{count}": {"type": "integer"}},
                          "$ref": "#/$defs/a0"}, param="tools", what="the schema")
    with pytest.raises(RequestError, match="recurses without end"):
        check_recursion_ends({"$defs": {**defs, f"a{count}": {"$ref": "#/$defs/a0"}},
                              "$ref": "#/$defs/a0"}, param="tools", what="the schema")
