"""Benchmark report: latency percentiles and throughput per level, as a table, JSON and a plot."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from levante.errors import ModelFileError

if TYPE_CHECKING:
    from levante.bench.load import LevelRun

REPORT_FORMAT = 1  # "levante_bench" version in report JSON files
MAX_ERRORS_KEPT = 5


@dataclass
class LevelSummary:
    """One scenario at one concurrency: latency percentiles (seconds), throughput (tokens/s)."""

    scenario: str
    concurrency: int
    input_len: int
    output_len: int
    expected_s: float  # the post's expected end-to-end time for this scenario
    num_requests: int
    num_errors: int
    duration_s: float
    mean_prompt_tokens: float | None  # as the server counted them (None if it did not say)
    mean_output_tokens: float
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p95: float | None
    e2e_p50: float | None
    e2e_p95: float | None
    stream_tokens_per_s: float | None  # median over requests of (tokens - 1) / (e2e - ttft)
    aggregate_tokens_per_s: float  # all output tokens / the level's wall time
    token_source: str  # "usage" (server-reported) or "chunks" (one token per chunk assumed)
    prompt_tokens_exact: bool  # prompts fitted with the model's tokenizer
    errors: list[str] = field(default_factory=list)
    ttft_samples: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(run: LevelRun) -> LevelSummary:
    """Percentiles and throughputs of one level's requests (failed requests count as errors)."""
    ok = [r for r in run.records if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    per_stream = [(r.output_tokens - 1) / (r.e2e_s - r.ttft_s) for r in ok
                  if r.output_tokens > 1 and r.e2e_s is not None and r.ttft_s is not None
                  and r.e2e_s > r.ttft_s]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    sources = {r.token_source for r in ok}
    scenario = run.scenario
    return LevelSummary(
        scenario=scenario.name, concurrency=run.concurrency, input_len=scenario.input_len,
        output_len=scenario.output_len, expected_s=scenario.expected_s,
        num_requests=len(run.records), num_errors=len(run.records) - len(ok),
        duration_s=run.wall_s,
        mean_prompt_tokens=statistics.fmean(prompts) if prompts else None,
        mean_output_tokens=statistics.fmean([r.output_tokens for r in ok]) if ok else 0.0,
        ttft_p50=_percentile(ttft, 50), ttft_p95=_percentile(ttft, 95),
        ttft_p99=_percentile(ttft, 99), itl_p50=_percentile(itl, 50),
        itl_p95=_percentile(itl, 95), e2e_p50=_percentile(e2e, 50),
        e2e_p95=_percentile(e2e, 95),
        stream_tokens_per_s=statistics.median(per_stream) if per_stream else None,
        aggregate_tokens_per_s=sum(r.output_tokens for r in ok) / run.wall_s,
        token_source="usage" if sources == {"usage"} else "chunks",
        prompt_tokens_exact=run.prompt_tokens_exact,
        errors=list(dict.fromkeys(r.error for r in run.records if r.error))[:MAX_ERRORS_KEPT],
        ttft_samples=ttft)


@dataclass
class BenchReport:
    """Everything one `levante bench` run measured."""

    base_url: str
    model: str
    ignore_eos: bool  # whether the server accepted ignore_eos (else outputs may end early)
    started_at: str
    levels: list[LevelSummary]

    def to_json(self) -> dict[str, Any]:
        """The object `levante bench --json` prints and `levante cost --bench` reads."""
        return {"levante_bench": REPORT_FORMAT, "base_url": self.base_url, "model": self.model,
                "ignore_eos": self.ignore_eos, "started_at": self.started_at,
                "levels": [asdict(level) for level in self.levels]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchReport:
        """Inverse of `to_json` (raises KeyError/TypeError on a malformed object)."""
        names = {f.name for f in fields(LevelSummary)}
        levels = [LevelSummary(**{k: v for k, v in level.items() if k in names})
                  for level in data["levels"]]
        return cls(data["base_url"], data["model"], data["ignore_eos"], data["started_at"],
                   levels)


def read_report(path: str | Path) -> BenchReport:
    """A report saved from `levante bench --json` / `--out`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"cannot read bench report JSON ({e})") from None
    if not isinstance(data, dict) or data.get("levante_bench") != REPORT_FORMAT:
        raise ModelFileError(path, "not a `levante bench --json` report (no levante_bench: 1)")
    try:
        return BenchReport.from_json(data)
    except (KeyError, TypeError) as e:
        raise ModelFileError(path, f"malformed bench report ({e})") from None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report_table(report: BenchReport) -> Table:
    """One row per scenario x concurrency, with the post's expected time beside the measured."""
    table = Table("scenario", "conc", "ok/err", "prompt tok", "out tok", "TTFT p50/p95/p99 ms",
                  "ITL p50/p95 ms", "tok/s stream", "tok/s total", "e2e p50 s",
                  "expected s (post)", title=f"{report.model} @ {report.base_url}")
    for s in report.levels:
        prompt = _num(s.mean_prompt_tokens, 0) if s.mean_prompt_tokens is not None \
            else f"~{s.input_len}"
        table.add_row(s.scenario, str(s.concurrency),
                      f"{s.num_requests - s.num_errors}/{s.num_errors}", prompt,
                      _num(s.mean_output_tokens, 0),
                      f"{_ms(s.ttft_p50)}/{_ms(s.ttft_p95)}/{_ms(s.ttft_p99)}",
                      f"{_ms(s.itl_p50)}/{_ms(s.itl_p95)}", _num(s.stream_tokens_per_s),
                      _num(s.aggregate_tokens_per_s), _num(s.e2e_p50, 2), _num(s.expected_s, 2))
    if not report.ignore_eos:
        table.caption = "server rejected ignore_eos: outputs may be shorter than asked"
    return table


def plot_report(report: BenchReport, path: str | Path) -> None:
    """PNG: aggregate and per-stream tokens/s vs concurrency, and the TTFT distributions."""
    from matplotlib.figure import Figure  # imported here: slow, and only plots need it

    figure = Figure(figsize=(12, 5), layout="constrained")
    throughput, ttft = figure.subplots(1, 2)
    for name in dict.fromkeys(s.scenario for s in report.levels):
        levels = [s for s in report.levels if s.scenario == name]
        x = [s.concurrency for s in levels]
        line, = throughput.plot(x, [s.aggregate_tokens_per_s for s in levels], marker="o",
                                label=f"{name} total")
        throughput.plot(x, [s.stream_tokens_per_s or 0.0 for s in levels], marker="x",
                        linestyle="--", color=line.get_color(), label=f"{name} per stream")
    throughput.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s",
                   title="Throughput vs concurrency")
    throughput.set_xticks(sorted({s.concurrency for s in report.levels}))
    throughput.set_xticklabels([str(c) for c in sorted({s.concurrency for s in report.levels})])
    throughput.legend(fontsize="small")
    samples = [[t * 1000 for t in s.ttft_samples] or [0.0] for s in report.levels]
    ttft.boxplot(samples, tick_labels=[f"{s.scenario}\nx{s.concurrency}" for s in report.levels])
    ttft.set(ylabel="time to first token (ms)", title="TTFT distribution")
    figure.suptitle(f"{report.model} @ {report.base_url}")
    figure.savefig(path, format="png", dpi=100)
