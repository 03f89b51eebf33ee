"""Cut OpenAI's OpenAPI spec down to the schemas ropeway's tests validate against.

    python tests/data/openai-openapi/trim.py path/to/openapi.yaml COMMIT

keeps components.schemas reachable (through $ref) from ROOTS, with descriptions and
examples dropped, and writes openapi-trimmed.yaml beside this file. The whole spec is ~3 MB.
"""

import sys
from pathlib import Path

import yaml

ROOTS = [
    "CreateCompletionRequest", "CreateCompletionResponse",
    "CreateChatCompletionRequest", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
    "ListModelsResponse", "Model", "ErrorResponse",
]
DROPPED_KEYS = {"description", "example", "examples", "x-oaiMeta", "title"}


def without_prose(node, names_properties: bool = False):
    """node without its prose keys; under "properties" every key is a field name, kept."""
    if isinstance(node, dict):
        return {key: without_prose(value, key == "properties" and not names_properties)
                for key, value in node.items() if names_properties or key not in DROPPED_KEYS}
    if isinstance(node, list):
        return [without_prose(item) for item in node]
    return node


def reachable(schemas: dict, roots: list[str]) -> set[str]:
    found, pending = set(), list(roots)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        stack = [schemas[name]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str):
                    pending.append(ref.rsplit("/", 1)[-1])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return found


def main(source: str, commit: str) -> None:
    spec = yaml.safe_load(Path(source).read_text())
    schemas = spec["components"]["schemas"]
    kept = {name: without_prose(schemas[name]) for name in sorted(reachable(schemas, ROOTS))}
    trimmed = {
        "openapi": spec["openapi"],
        "info": {"title": spec["info"]["title"], "version": spec["info"]["version"],
                 "x-source": f"github.com/openai/openai-openapi openapi.yaml at {commit}, cut by trim.py"},
        "components": {"schemas": kept},
    }
    out = Path(__file__).with_name("openapi-trimmed.yaml")
    out.write_text(yaml.safe_dump(trimmed, sort_keys=False, width=120))


if __name__ == "__main__":
    main(*sys.argv[1:])
