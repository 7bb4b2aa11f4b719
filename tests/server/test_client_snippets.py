"""The client snippets in docs/clients.md, run as written against a live server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
DOC_ADDRESS = "127.0.0.1:8000"


def _snippets() -> dict[str, str]:
    """Each ```python block under its ### heading."""
    sections = re.split(r"^### ", DOC.read_text(), flags=re.MULTILINE)[1:]
    blocks = {}
    for section in sections:
        title = section.splitlines()[0]
        code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
        if code:
            blocks[title] = "\n".join(code)
    return blocks


def test_the_doc_has_the_three_clients() -> None:
    titles = list(_snippets())
    assert len(titles) == 3
    assert [any(word in t for t in titles) for word in ("openai", "ChatOpenAI", "Ollama")] == [
        True] * 3


@pytest.mark.parametrize("title", list(_snippets()))
def test_snippet_runs_against_the_server(title: str, server, capsys, monkeypatch) -> None:
    if "ChatOpenAI" in title:
        pytest.importorskip("langchain_openai", reason="pip install langchain-openai")
        monkeypatch.delenv("LANGSMITH_TRACING", raising=False)  # no calls to LangSmith
    code = _snippets()[title]
    assert DOC_ADDRESS in code
    address = server.base_url.removeprefix("http://")
    source = compile(code.replace(DOC_ADDRESS, address), f"{DOC.name}: {title}", "exec")
    exec(source, {})  # noqa: S102 - running the doc's own snippets is the test
    lines = capsys.readouterr().out.splitlines()
    assert "Paris" in lines[0] and lines[1] == lines[0]  # streamed equals whole (greedy)
    server.wait_idle()
