"""Cost sheet: monthly API cost from a price table, and self-hosting cost from measured speed."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from levante.errors import ConfigError

HOURS_PER_MONTH = 730.0  # 365 days x 24 h / 12 months, the usual cloud-billing month
TOKEN_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


@dataclass(frozen=True)
class Price:
    """One model's API price in dollars per million tokens."""

    name: str
    input_per_million: float
    output_per_million: float
    note: str = ""


@dataclass(frozen=True)
class PriceTable:
    """A price list with where and when it was taken."""

    prices: tuple[Price, ...]
    taken: str
    source: str
    path: str


@dataclass(frozen=True)
class MonthlyCost:
    """What one model costs for a month's input and output volume, with the sum shown."""

    name: str
    input_tokens: int
    output_tokens: int
    input_cost: float
    output_cost: float
    arithmetic: str

    @property
    def total(self) -> float:
        """Input plus output cost in dollars."""
        return self.input_cost + self.output_cost


@dataclass(frozen=True)
class SelfHostCost:
    """Running your own GPU: cost per million output tokens and per month, with the sums."""

    gpu_hourly: float
    tokens_per_s: float
    utilization: float
    cost_per_million: float
    gpu_hours: float
    usage_cost: float  # gpu_hours x hourly: renting exactly the hours the volume needs
    num_gpus: int
    dedicated_cost: float  # num_gpus x hourly x 730 h: GPUs kept on all month
    arithmetic: tuple[str, ...]


def default_prices_path() -> Path:
    """The shipped price table (the post's prices, January 2025)."""
    return Path(str(resources.files("levante") / "data" / "prices.yaml"))


def parse_token_count(text: str | int) -> int:
    """'10M' -> 10_000_000; accepts k/M/B suffixes, underscores and commas."""
    if isinstance(text, int):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
        if match is None:
            raise ConfigError(f"cannot read token count {text!r} (try 10M, 500k or 2B)")
        value = float(match.group(1).replace("_", "").replace(",", ""))
        value *= TOKEN_SUFFIXES[match.group(2).lower()]
    if value < 0 or value != int(value):
        raise ConfigError(f"token count must be a whole number >= 0, got {text!r}")
    return int(value)


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Read a price table YAML (default: the shipped one) and validate every entry."""
    path = Path(path) if path is not None else default_prices_path()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read price table ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(f"{path}: expected a mapping with a 'models' list")
    for key in ("taken", "source"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"{path}: '{key}' must be a string (when/where prices were taken)")
    prices = tuple(_read_price(path, i, entry) for i, entry in enumerate(data["models"]))
    if not prices:
        raise ConfigError(f"{path}: 'models' is empty")
    return PriceTable(prices, data["taken"], data["source"], str(path))


def _read_price(path: Path, index: int, entry: Any) -> Price:
    where = f"{path}: models[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where} needs a 'name' string")
    values = []
    for key in ("input_per_million", "output_per_million"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or not math.isfinite(value):
            raise ConfigError(f"{where}.{key} must be a number >= 0, got {value!r}")
        values.append(float(value))
    return Price(entry["name"], values[0], values[1], str(entry.get("note", "")))


def monthly_cost(price: Price, input_tokens: int, output_tokens: int) -> MonthlyCost:
    """Cost of one month's volume at `price`, e.g. 10M in x $0.10/M = $1.00."""
    input_cost = input_tokens / 1e6 * price.input_per_million
    output_cost = output_tokens / 1e6 * price.output_per_million
    arithmetic = (f"{_millions(input_tokens)} x ${price.input_per_million:g}/M = ${input_cost:,.2f}"
                  f" + {_millions(output_tokens)} x ${price.output_per_million:g}/M = "
                  f"${output_cost:,.2f} -> ${input_cost + output_cost:,.2f}")
    return MonthlyCost(price.name, input_tokens, output_tokens, input_cost, output_cost,
                       arithmetic)


def monthly_costs(table: PriceTable, input_tokens: int, output_tokens: int) -> list[MonthlyCost]:
    """`monthly_cost` for every model in the table, in table order."""
    return [monthly_cost(p, input_tokens, output_tokens) for p in table.prices]


def self_host_cost(gpu_hourly: float, tokens_per_s: float, utilization: float, *,
                   output_tokens: int) -> SelfHostCost:
    """Self-hosting: a GPU at `gpu_hourly` $/h producing `tokens_per_s` output tokens/s.

    `tokens_per_s` is a measured aggregate (from `levante bench --json`), so the input
    processing of that benchmark's workload is already inside it; `utilization` is the share
    of the hours the GPU is actually busy serving.
    """
    if gpu_hourly < 0 or not math.isfinite(gpu_hourly):
        raise ConfigError(f"gpu_hourly must be a number >= 0, got {gpu_hourly!r}")
    if tokens_per_s <= 0 or not math.isfinite(tokens_per_s):
        raise ConfigError(f"tokens_per_s must be > 0, got {tokens_per_s!r}")
    if not 0 < utilization <= 1:
        raise ConfigError(f"utilization must be in (0, 1], got {utilization!r}")
    tokens_per_hour = tokens_per_s * utilization * 3600
    cost_per_million = gpu_hourly / tokens_per_hour * 1e6
    gpu_hours = output_tokens / tokens_per_hour
    num_gpus = max(1, math.ceil(gpu_hours / HOURS_PER_MONTH))
    arithmetic = (
        (f"{tokens_per_s:,.1f} tok/s x {utilization:g} utilization x 3600 s = "
         f"{tokens_per_hour:,.0f} output tokens per GPU-hour"),
        (f"${gpu_hourly:g}/h / {tokens_per_hour:,.0f} tok/h x 1M = ${cost_per_million:,.4f} "
         "per million output tokens"),
        (f"{_millions(output_tokens)} / {tokens_per_hour:,.0f} tok/h = {gpu_hours:,.1f} "
         f"GPU-hours x ${gpu_hourly:g} = ${gpu_hours * gpu_hourly:,.2f} if billed by the hour"),
        (f"{gpu_hours:,.1f} h / {HOURS_PER_MONTH:g} h per month -> {num_gpus} GPU(s) on all "
         f"month x ${gpu_hourly:g} x {HOURS_PER_MONTH:g} h = "
         f"${num_gpus * gpu_hourly * HOURS_PER_MONTH:,.2f}"),
    )
    return SelfHostCost(gpu_hourly, tokens_per_s, utilization, cost_per_million, gpu_hours,
                        gpu_hours * gpu_hourly, num_gpus, num_gpus * gpu_hourly * HOURS_PER_MONTH,
                        arithmetic)


def _millions(tokens: int) -> str:
    return f"{tokens / 1e6:,.6g}M tok"


@dataclass(frozen=True)
class CostSheet:
    """API costs for a month's volume, and optionally the self-hosting alternative."""

    table: PriceTable
    api: tuple[MonthlyCost, ...]
    self_host: SelfHostCost | None
    throughput_source: str  # where the self-hosting tokens/s came from

    def to_json(self) -> dict[str, Any]:
        """The object `levante cost --json` prints."""
        api = [{"name": c.name, "input_tokens": c.input_tokens, "output_tokens": c.output_tokens,
                "input_cost": c.input_cost, "output_cost": c.output_cost, "total": c.total,
                "arithmetic": c.arithmetic} for c in self.api]
        host = None
        if self.self_host is not None:
            host = {**asdict(self.self_host), "arithmetic": list(self.self_host.arithmetic),
                    "throughput_source": self.throughput_source}
        return {"prices": {"path": self.table.path, "taken": self.table.taken,
                           "source": self.table.source}, "api": api, "self_host": host}


def bench_tokens_per_s(path: str | Path, *, scenario: str | None = None,
                       concurrency: int | None = None) -> tuple[float, str]:
    """Aggregate output tokens/s from a `levante bench --json` file, and which level it is.

    Without a scenario/concurrency filter, the level with the highest aggregate throughput
    (the GPU's capacity as measured) is used.
    """
    from levante.bench.report import read_report

    levels = [level for level in read_report(path).levels
              if (scenario is None or level.scenario == scenario)
              and (concurrency is None or level.concurrency == concurrency)
              and level.aggregate_tokens_per_s > 0]
    if not levels:
        raise ConfigError(f"{path}: no benchmark level with output matches scenario={scenario} "
                          f"concurrency={concurrency}")
    best = max(levels, key=lambda level: level.aggregate_tokens_per_s)
    source = (f"{path}: scenario {best.scenario} ({best.input_len} in / {best.output_len} out) "
              f"at concurrency {best.concurrency}")
    return best.aggregate_tokens_per_s, source


def cost_sheet(input_tokens: int, output_tokens: int, *, prices: str | Path | None = None,
               bench: str | Path | None = None, tokens_per_s: float | None = None,
               gpu_hourly: float | None = None, utilization: float = 0.6,
               scenario: str | None = None, concurrency: int | None = None) -> CostSheet:
    """Everything `levante cost` shows: API prices for the volume, and self-hosting when given
    a GPU price plus a throughput (measured: `bench`, or stated: `tokens_per_s`)."""
    table = load_prices(prices)
    api = tuple(monthly_costs(table, input_tokens, output_tokens))
    if (bench is None and tokens_per_s is None) != (gpu_hourly is None):
        raise ConfigError("self-hosting needs both --gpu-hourly and a throughput "
                          "(--bench FILE or --tokens-per-s N)")
    if gpu_hourly is None:
        return CostSheet(table, api, None, "")
    if bench is not None and tokens_per_s is not None:
        raise ConfigError("give --bench or --tokens-per-s, not both")
    source = "given with --tokens-per-s"
    if bench is not None:
        tokens_per_s, source = bench_tokens_per_s(bench, scenario=scenario,
                                                  concurrency=concurrency)
    assert tokens_per_s is not None
    host = self_host_cost(gpu_hourly, tokens_per_s, utilization, output_tokens=output_tokens)
    return CostSheet(table, api, host, source)


def api_table(sheet: CostSheet) -> Table:
    """Monthly API cost per model, with the sum that gives it."""
    table = Table("model", "input $", "output $", "total $ / month", "arithmetic",
                  title=f"API prices taken {sheet.table.taken} ({sheet.table.source})")
    for cost in sheet.api:
        table.add_row(cost.name, f"{cost.input_cost:,.2f}", f"{cost.output_cost:,.2f}",
                      f"{cost.total:,.2f}", cost.arithmetic)
    return table
