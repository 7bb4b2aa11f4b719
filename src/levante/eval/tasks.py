"""What every eval task shares: data files, the model under test (local or endpoint), results."""

from __future__ import annotations

import gzip
import json
import math
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from levante.errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from levante.load_config import LoadConfig

RESULT_FORMAT = 1  # "levante_eval" version in result JSON files
LOCAL_CHUNK = 64  # prompts handed to the engine at once (its queue is bounded)
ENDPOINT_WORKERS = 8  # requests in flight against an API endpoint


# -- data files ------------------------------------------------------------------------------

def read_records(path: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL (.jsonl, .jsonl.gz), JSON list or parquet file, as HF datasets write them."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "data file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        rows = _read_parquet(path)
    elif name.endswith(".json"):
        rows = _read_json_list(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        rows = _read_jsonl(path)
    else:
        raise ModelFileError(path, "unknown data format: expected .jsonl, .jsonl.gz, .json or "
                             ".parquet")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ModelFileError(path, f"line {line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ModelFileError(path, f"line {line_no}: expected a JSON object")
            rows.append(row)
    return rows


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"cannot read JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ModelFileError(path, "expected a JSON list of objects")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ModelFileError(path, "reading parquet needs pyarrow (pip install pyarrow), "
                             "or convert the file to JSONL") from None
    return pq.read_table(path).to_pylist()


def require_fields(path: str | Path, index: int, row: dict[str, Any],
                   names: Sequence[str]) -> None:
    """Raise naming the file, row and field when a record lacks one of `names`."""
    for name in names:
        if name not in row:
            raise ModelFileError(path, f"record {index} has no {name!r} field "
                                 f"(has {sorted(row)})")


# -- the model under test --------------------------------------------------------------------

@dataclass
class LocalModel:
    """A model loaded in this process: loglikelihoods and batched greedy generation."""

    name: str
    llm: Any  # levante.llm.LLM

    def complete(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuations of raw text prompts."""
        return self._generate(list(prompts), max_tokens, stop)

    def chat(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy answers to prompts sent as one user message each."""
        ids = [self.llm.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        return self._generate(ids, max_tokens, stop)

    def _generate(self, prompts: list[Any], max_tokens: int, stop: Sequence[str]) -> list[str]:
        from levante.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop))
        texts: list[str] = []
        for start in range(0, len(prompts), LOCAL_CHUNK):
            texts += [c.text for c in self.llm.generate(prompts[start:start + LOCAL_CHUNK],
                                                        params)]
        return [cut_at_stop(t, stop) for t in texts]


@dataclass
class EndpointModel:
    """A model behind an OpenAI-compatible endpoint, queried with the `openai` client."""

    name: str
    client: Any  # openai.OpenAI

    def complete(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuations through /v1/completions."""
        def one(prompt: str) -> str:
            response = self.client.completions.create(
                model=self.name, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                stop=list(stop)[:4] or None)  # OpenAI's API takes at most 4 stop strings
            return cut_at_stop(response.choices[0].text or "", stop)
        return self._map(one, prompts)

    def chat(self, prompts: list[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy answers through /v1/chat/completions, one user message each."""
        def one(prompt: str) -> str:
            response = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens, temperature=0.0, stop=list(stop)[:4] or None)
            return cut_at_stop(response.choices[0].message.content or "", stop)
        return self._map(one, prompts)

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) per (context, continuation) text
        pair, from /v1/completions with echo, logprobs 1 and max_tokens 0 (OpenAI's legacy
        scoring, which Levante and vLLM serve): the continuation is the tokens whose text
        starts at or after the context's end."""
        def one(pair: tuple[str, str]) -> tuple[float, bool]:
            context, continuation = pair
            response = self.client.completions.create(
                model=self.name, prompt=context + continuation, max_tokens=0, echo=True,
                logprobs=1, temperature=0.0)
            scores = response.choices[0].logprobs
            total, greedy = 0.0, True
            for offset, logprob, top in zip(scores.text_offset, scores.token_logprobs,
                                            scores.top_logprobs):
                if offset < len(context) or logprob is None:
                    continue
                total += logprob
                greedy = greedy and bool(top) and logprob >= max(top.values())
            return total, greedy
        with ThreadPoolExecutor(ENDPOINT_WORKERS) as pool:
            return list(pool.map(one, pairs))

    @staticmethod
    def _map(fn: Any, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(ENDPOINT_WORKERS) as pool:
            return list(pool.map(fn, prompts))


def open_model(ref: str, *, base_url: str | None = None, api_key: str | None = None,
               load_config: LoadConfig | None = None) -> LocalModel | EndpointModel:
    """`ref` loaded locally as `load_config` says, or (with `base_url`) the model named `ref`
    at that endpoint."""
    if base_url is None:
        from levante.llm import LLM

        return LocalModel(ref, LLM(ref, load_config=load_config))
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=2)
    return EndpointModel(ref, client)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


# -- results ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One score with its standard error (None when it cannot be estimated)."""

    name: str
    value: float
    stderr: float | None
    higher_is_better: bool = True


@dataclass
class TaskResult:
    """A task's scores for one model, with per-sample details; saved as JSON."""

    task: str
    model: str
    metrics: list[Metric]
    num_samples: int
    data: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object `levante eval --json` prints and `--compare` reads."""
        return {"levante_eval": RESULT_FORMAT, "task": self.task, "model": self.model,
                "data": self.data, "num_samples": self.num_samples,
                "metrics": [asdict(m) for m in self.metrics], "config": self.config,
                "samples": self.samples}


def mean_metric(name: str, values: Sequence[float]) -> Metric:
    """Mean with its standard error, stdev(ddof=1)/sqrt(n), as lm-evaluation-harness reports."""
    if not values:
        raise ConfigError(f"no samples to score for {name}")
    mean = statistics.fmean(values)
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return Metric(name, mean, stderr)


def read_result(path: str | Path) -> TaskResult:
    """A result file written from `TaskResult.to_json()`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"cannot read eval result JSON ({e})") from None
    if not isinstance(data, dict) or data.get("levante_eval") != RESULT_FORMAT:
        raise ModelFileError(path, "not a `levante eval --json` result (no levante_eval: 1)")
    try:
        metrics = [Metric(**m) for m in data["metrics"]]
        return TaskResult(data["task"], data["model"], metrics, int(data["num_samples"]),
                          data.get("data", ""), data.get("config", {}), data.get("samples", []))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(path, f"malformed eval result ({e})") from None


def _cell(metric: Metric | None) -> str:
    if metric is None:
        return "-"
    if metric.stderr is None:
        return f"{metric.value:.4f}"
    return f"{metric.value:.4f} ± {metric.stderr:.4f}"


def results_table(result: TaskResult) -> Table:
    """One task's scores: metric, value ± standard error, number of samples."""
    table = Table("task", "metric", "value ± stderr", "n", title=result.model)
    for metric in result.metrics:
        table.add_row(result.task, metric.name, _cell(metric), str(result.num_samples))
    return table


def compare_files(paths: Sequence[str | Path]) -> Table:
    """`compare_table` of result files, labelled by model, or by file name when models repeat."""
    results = [read_result(p) for p in paths]
    keys = [(r.model, r.task) for r in results]
    labels = [r.model for r in results] if len(set(keys)) == len(keys) \
        else [Path(p).stem for p in paths]
    return compare_table(results, labels)


def compare_table(results: Sequence[TaskResult], labels: Sequence[str] | None = None) -> Table:
    """Models side by side (one column each) over every task and metric they report.

    With exactly two models a last column gives b - a and the standard error of the difference,
    sqrt(se_a^2 + se_b^2), treating the two runs as independent.
    """
    labels = list(labels) if labels is not None else [r.model for r in results]
    models = list(dict.fromkeys(labels))
    cells: dict[tuple[str, str], dict[str, Metric]] = {}
    for label, result in zip(labels, results):
        for metric in result.metrics:
            cells.setdefault((result.task, metric.name), {})[label] = metric
    table = Table("task", "metric", *models, *(["b - a"] if len(models) == 2 else []))
    for (task, name), by_model in cells.items():
        row = [task, name, *(_cell(by_model.get(m)) for m in models)]
        if len(models) == 2:
            row.append(_difference(by_model.get(models[0]), by_model.get(models[1])))
        table.add_row(*row)
    return table


def _difference(a: Metric | None, b: Metric | None) -> str:
    if a is None or b is None:
        return "-"
    stderr = None
    if a.stderr is not None and b.stderr is not None:
        stderr = math.hypot(a.stderr, b.stderr)
    return _cell(Metric("diff", b.value - a.value, stderr))


def perplexity_task_result(result: Any) -> TaskResult:
    """A `levante.eval.perplexity.PerplexityResult` as a TaskResult (lower is better, one
    number over the whole text, so no standard error), for the same table and --compare."""
    metric = Metric("perplexity", result.perplexity, None, higher_is_better=False)
    config = {"window": result.window, "stride": result.stride, "quant": result.quant,
              "seconds": result.seconds}
    return TaskResult("perplexity", result.model, [metric], result.num_tokens, result.data,
                      config)
