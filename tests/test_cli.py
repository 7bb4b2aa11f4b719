"""The CLI: generate --json shape, pull/list, and clear errors (no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from levante.cli import app

runner = CliRunner()


def test_generate_json_shape(smollm2_gguf: Path) -> None:
    result = runner.invoke(app, ["generate", str(smollm2_gguf), "--chat", "--prompt",
                                 "What is the capital of France? Answer in one word.", "--max-tokens", "8",
                                 "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(data) == {"prompt_token_ids", "token_ids", "text", "finish_reason",
                         "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert len(data["token_ids"]) <= 8 and "Paris" in data["text"]
    assert data["finish_reason"] in ("stop", "length")


def test_run_one_shot(smollm2_gguf: Path) -> None:
    result = runner.invoke(app, ["run", str(smollm2_gguf), "Say hello.", "--max-tokens", "8",
                                 "--temperature", "0"])
    assert result.exit_code == 0 and result.stdout.strip()


def test_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "a-folder-name-long-enough-to-wrap-an-80-column-line" / "broken[1].gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    result = runner.invoke(app, ["generate", str(bad), "--prompt", "hi"])
    assert result.exit_code == 1
    # the whole path on one line (not wrapped at the terminal's width, brackets not markup)
    assert f"error: {bad}: 14 bytes is too small" in result.output, result.output
    assert "Traceback" not in result.output


def test_pickle_refused(tmp_path: Path) -> None:
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"not really a pickle")
    result = runner.invoke(app, ["generate", str(weights), "--prompt", "hi"])
    assert result.exit_code == 1 and "safetensors" in result.output


def test_bad_sampling_value() -> None:
    result = runner.invoke(app, ["generate", "smollm2", "--prompt", "hi", "--temperature",
                                 "-1"])
    assert result.exit_code == 1 and "temperature" in result.output


def test_list_shows_the_default_model(smollm2_gguf: Path) -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "smollm2" in result.output


def test_generate_with_json_schema(smollm2_gguf: Path, tmp_path: Path) -> None:
    import jsonschema

    schema = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 20}}}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema))
    result = runner.invoke(app, ["generate", str(smollm2_gguf), "--prompt",
                                 "What is the capital of France? Answer in one word.", "--json-schema", str(path),
                                 "--max-tokens", "40", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["finish_reason"] == "stop"
    jsonschema.validate(json.loads(data["text"]), schema)


def test_generate_with_q8_0_kv_cache(smollm2_gguf: Path) -> None:
    """--kv-cache-dtype q8_0 (llama.cpp's 8-bit KV) still answers; a bad value is one line."""
    result = runner.invoke(app, ["generate", str(smollm2_gguf), "--chat", "--prompt",
                                 "What is the capital of France? Answer in one word.",
                                 "--max-tokens", "8", "--kv-cache-dtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    bad = runner.invoke(app, ["generate", str(smollm2_gguf), "--prompt", "hi",
                              "--kv-cache-dtype", "int3"])
    assert bad.exit_code == 1
    assert "kv_cache_dtype must be one of" in bad.output and "Traceback" not in bad.output


def test_serve_batch_invariant_reaches_the_engine(monkeypatch, smollm2_gguf) -> None:
    """--batch-invariant: ServerConfig -> EngineConfig; on the CPU with the quantized kernels
    nothing needs splitting (the kernels already are batch-invariant)."""
    from typer.testing import CliRunner

    import levante.server.app
    from levante.cli import app
    from levante.server.routes import ServerState

    seen = []
    monkeypatch.setattr(levante.server.app, "serve", seen.append)
    result = CliRunner().invoke(app, ["serve", "m", "--batch-invariant"])
    assert result.exit_code == 0, result.output
    assert seen[0].batch_invariant is True
    config = seen[0].__class__(ref=str(smollm2_gguf), batch_invariant=True, max_model_len=256)
    state = ServerState.build(config)
    assert state.engine.engine.config.batch_invariant is True
    assert state.engine.engine.split_batches is False


def test_serve_max_stored_responses_reaches_the_config(monkeypatch) -> None:
    from typer.testing import CliRunner

    import levante.server.app
    from levante.cli import app

    seen = []
    monkeypatch.setattr(levante.server.app, "serve", seen.append)
    result = CliRunner().invoke(app, ["serve", "m", "--max-stored-responses", "3"])
    assert result.exit_code == 0, result.output
    assert seen[0].max_stored_responses == 3
    bad = CliRunner().invoke(app, ["serve", "m", "--max-stored-responses", "-1"])
    assert bad.exit_code != 0 and "max_stored_responses must be >= 0" in bad.output


def _levante(*args: str) -> subprocess.CompletedProcess[str]:
    """The console entry point in a new process, stdout and stderr piped (block-buffered)."""
    return subprocess.run([sys.executable, "-m", "levante", *args],
                          check=False, capture_output=True, text=True, timeout=300)


def test_entry_point_prints_everything_and_exits_with_the_command_status(
        smollm2_gguf: Path, tmp_path: Path) -> None:
    """main() skips the interpreter's teardown (os._exit): the piped output still arrives whole,
    and the status is the command's."""
    done = _levante("generate", str(smollm2_gguf), "--prompt", "Hi", "--max-tokens", "2",
                    "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["token_ids"]) == 2
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF")
    failed = _levante("generate", str(bad), "--prompt", "hi")
    assert failed.returncode == 1 and f"error: {bad}:" in failed.stderr, failed.stderr
    usage = _levante("generate")  # a usage error: click's status 2
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_fast_exit_waits_for_threads_and_runs_atexit_handlers() -> None:
    script = """
import atexit, threading, time
from levante.cli import _exit
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
print("before exit", end="")
_exit(3)
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["before exitthread done", "atexit ran"]
    code = "from levante.cli import _exit; _exit('no model named x')"
    message = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                             text=True, timeout=120)
    assert message.returncode == 1 and message.stderr == "no model named x\n"


def test_only_the_entry_point_raises_the_collector_threshold() -> None:
    """`levante` (levante.__main__) collects less often while it starts; importing the CLI
    or the library leaves the process's collector alone."""
    code = ("import gc; {}; print(gc.get_threshold()[0])")
    first = [subprocess.run([sys.executable, "-c", code.format(f"import {module}")], check=True,
                            capture_output=True, text=True, timeout=120).stdout.strip()
             for module in ("levante.__main__", "levante.cli", "levante.llm")]
    default = subprocess.run([sys.executable, "-c", code.format("pass")], check=True,
                             capture_output=True, text=True, timeout=120).stdout.strip()
    assert first == ["10000", default, default]
