"""The str enums read, print and serialize as their plain values (JSON and CLI output unchanged)."""

from __future__ import annotations

import json

from levante.kinds import FinishReason, WeightFormat


def test_a_member_is_its_value_everywhere_text_is_made() -> None:
    reason = FinishReason.TOOL_CALLS
    assert reason == "tool_calls" and isinstance(reason, str)
    assert json.dumps({"finish_reason": reason}) == '{"finish_reason": "tool_calls"}'
    assert str(reason) == f"{reason}" == "tool_calls"
    assert f"{WeightFormat.SAFETENSORS_HF:>15}" == " safetensors-hf"
    assert FinishReason("stop") is FinishReason.STOP
