"""The cost sheet reproduces hand-computed totals; self-hosting reads a bench report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from levante.bench.report import BenchReport, LevelSummary
from levante.cost import cost_sheet, load_prices, monthly_costs, parse_token_count, self_host_cost
from levante.errors import ConfigError

# Totals worked by hand from the post's prices ($/M in, $/M out):
# Mistral Small 3 0.10/0.30, GPT-4o Mini 0.15/0.60, GPT-4o 2.50/10.00, Llama 3.3 70B 0.23/0.40.
WORKLOADS = {
    # 10M x 0.10 = 1.00 + 50M x 0.30 = 15.00 -> 16.00, etc.
    ("10M", "50M"): {"Mistral Small 3": 16.00, "GPT-4o Mini": 31.50, "GPT-4o": 525.00,
                     "Llama 3.3 70B": 22.30},
    # 100M in, 20M out: 10 + 6; 15 + 12; 250 + 200; 23 + 8
    ("100M", "20M"): {"Mistral Small 3": 16.00, "GPT-4o Mini": 27.00, "GPT-4o": 450.00,
                      "Llama 3.3 70B": 31.00},
    # 2.5M in, 750k out: 0.25 + 0.225; 0.375 + 0.45; 6.25 + 7.5; 0.575 + 0.30
    ("2.5M", "750k"): {"Mistral Small 3": 0.475, "GPT-4o Mini": 0.825, "GPT-4o": 13.75,
                       "Llama 3.3 70B": 0.875},
}


def test_shipped_prices_are_the_posts() -> None:
    table = load_prices()
    assert table.taken == "2025-01" and "Mistral Small 3" in table.source
    assert [(p.name, p.input_per_million, p.output_per_million) for p in table.prices] == [
        ("Mistral Small 3", 0.10, 0.30), ("GPT-4o Mini", 0.15, 0.60), ("GPT-4o", 2.50, 10.00),
        ("Llama 3.3 70B", 0.23, 0.40)]


@pytest.mark.parametrize("volumes", list(WORKLOADS))
def test_monthly_totals_match_hand_computation(volumes: tuple[str, str]) -> None:
    costs = monthly_costs(load_prices(), *map(parse_token_count, volumes))
    assert {c.name: c.total for c in costs} == pytest.approx(WORKLOADS[volumes], abs=1e-9)


def test_ten_million_input_tokens_cost_one_dollar_not_a_hundred() -> None:
    """The post's own table says $100 here; its price of $0.10 per million says $1."""
    cost = monthly_costs(load_prices(), parse_token_count("10M"), 0)[0]
    assert cost.name == "Mistral Small 3" and cost.total == pytest.approx(1.0)
    assert "10M tok x $0.1/M = $1.00" in cost.arithmetic


@pytest.mark.parametrize("text,value", [("10M", 10_000_000), ("1.5k", 1500), ("2B", 2 * 10**9),
                                        ("1,000", 1000), ("750K", 750_000), (42, 42)])
def test_parse_token_count(text: str | int, value: int) -> None:
    assert parse_token_count(text) == value


@pytest.mark.parametrize("text", ["ten", "1.5", "-3M", "5T"])
def test_parse_token_count_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_token_count(text)


def test_self_hosting_arithmetic() -> None:
    # 1000 tok/s x 0.6 x 3600 = 2.16M tok/h; $2.50 / 2.16M x 1M = $1.1574/M;
    # 50M / 2.16M = 23.148 h -> $57.87 by the hour; one GPU all month = 2.5 x 730 = $1825.
    host = self_host_cost(2.5, 1000.0, 0.6, output_tokens=50_000_000)
    assert host.cost_per_million == pytest.approx(2.5 / 2.16)
    assert host.gpu_hours == pytest.approx(50 / 2.16)
    assert host.usage_cost == pytest.approx(50 / 2.16 * 2.5)
    assert (host.num_gpus, host.dedicated_cost) == (1, pytest.approx(1825.0))
    # 100 tok/s at full use: 360k tok/h; 1B tokens = 2777.8 h = 3.8 months -> 4 GPUs
    big = self_host_cost(2.0, 100.0, 1.0, output_tokens=10**9)
    assert big.cost_per_million == pytest.approx(2.0 / 0.36)
    assert (big.num_gpus, big.dedicated_cost) == (4, pytest.approx(4 * 2.0 * 730))
    with pytest.raises(ConfigError, match="utilization"):
        self_host_cost(2.0, 100.0, 1.5, output_tokens=1)


def _level(scenario: str, concurrency: int, aggregate: float) -> LevelSummary:
    return LevelSummary(scenario, concurrency, 500, 150, 1.476, 8, 0, 10.0, 500.0, 150.0,
                        0.1, 0.2, 0.3, 0.01, 0.02, 1.5, 1.7, 100.0, aggregate, "usage", True)


def test_self_hosting_from_a_bench_report(tmp_path: Path) -> None:
    report = BenchReport("http://127.0.0.1:8000/v1", "m", True, "2025-01-30T00:00:00+00:00",
                         [_level("faq", 1, 90.0), _level("faq", 16, 800.0),
                          _level("summary", 16, 400.0)])
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report.to_json()))
    sheet = cost_sheet(10_000_000, 50_000_000, bench=path, gpu_hourly=2.5, utilization=0.5)
    assert sheet.self_host is not None and sheet.self_host.tokens_per_s == 800.0  # the best
    assert "faq" in sheet.throughput_source and "concurrency 16" in sheet.throughput_source
    assert sheet.self_host.cost_per_million == pytest.approx(2.5 / (800 * 0.5 * 3600) * 1e6)
    summary = cost_sheet(1, 1, bench=path, gpu_hourly=2.5, scenario="summary")
    assert summary.self_host is not None and summary.self_host.tokens_per_s == 400.0
    json.dumps(sheet.to_json())
    with pytest.raises(ConfigError, match="gpu-hourly"):
        cost_sheet(1, 1, bench=path)


def test_bad_price_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("taken: '2025-02'\nsource: me\nmodels:\n  - name: X\n    input_per_million: "
                    "cheap\n    output_per_million: 1\n")
    with pytest.raises(ConfigError, match=r"models\[0\]\.input_per_million"):
        load_prices(path)
