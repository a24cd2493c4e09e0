"""The command lines as a user runs them: separate processes, from a temporary folder, reading only what
a terminal or a pipe would show."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ESC = "\x1b"


def cli(args, cwd, env=None, input=None, prog="cee_gen.cli", timeout=600):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", prog, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, input=input, timeout=timeout)


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-cli")
    make_tiny_checkpoint(path, n_layers=4, seed=3, max_pos=64)
    return str(path)


def test_empty_stop_is_refused_in_the_clis_words(tiny, tmp_path):
    line = one_line_error(cli(["--model", tiny, "--stop", "", "hi"], tmp_path))
    assert "--stop" in line and "stop=[" not in line


def test_output_file_count_reads_as_english(tiny, tmp_path):
    r = cli(["--model", tiny, "--max-new-tokens", "2", "--output", "out.jsonl", "hi"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 1 result to out.jsonl" in r.stderr and "1 results" not in r.stderr


def test_a_prompt_past_the_context_gets_our_error_and_no_tokenizer_warning(tiny, tmp_path):
    line = one_line_error(cli(["--model", tiny, "--raw", " ".join(["fox"] * 300)], tmp_path))
    assert "context" in line and "Token indices" not in line


def test_a_reader_that_leaves_early_gets_no_traceback(tiny, tmp_path):
    cmd = (f"{shlex.quote(sys.executable)} -m cee_gen.cli --model {shlex.quote(tiny)} --max-new-tokens 40 "
           "--json hi hello there | head -c 1")
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-1500:]


def test_ctrl_c_after_the_output_exits_without_a_python_message(tiny, tmp_path):
    """SIGINT sent once the answer is printed (the process is then writing stats or shutting down):
    status 130 or 0, and none of Python's 'Exception ignored ... KeyboardInterrupt'."""
    for delay in (0.0, 0.05, 0.2):
        p = subprocess.Popen([sys.executable, "-m", "cee_gen.cli", "--model", tiny, "--max-new-tokens", "3",
                              "--raw", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path)
        p.stdout.readline()  # the answer is out
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 130, -signal.SIGINT), (p.returncode, err[-1500:])
        assert "Exception ignored" not in err and "Traceback" not in err, err[-1500:]


def test_bench_help_says_what_each_preset_gives(tmp_path):
    r = cli(["--help"], tmp_path, prog="cee_gen.bench.cli")
    assert r.returncode == 0
    assert "(default: None)" not in r.stdout
    assert re.search(r"\(default: 10 with --preset cpu, 100\s+authors, 2 quick\)", r.stdout)


def test_bench_without_data_says_how_to_get_it(tmp_path):
    """No data folder, and (in this environment) either no `datasets` or no hub: the one line names the
    extra to install or the folder to pass."""
    r = cli(["--preset", "quick", "--datasets", "alpaca", "--out", "q.jsonl", "--no-hf"], tmp_path,
            env={"CEE_GEN_DATA": "", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
            prog="cee_gen.bench.cli")
    line = one_line_error(r)
    assert "--data-dir" in line
    assert not (tmp_path / "q.jsonl").exists()


# ---- the default model: the README's own lines, from a temp folder ----


def readme_line(fragment: str) -> list[str]:
    """The README's command line containing `fragment`, as argv (without `cee-generate`)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("cee-generate ") and fragment in line:
            return shlex.split(line.split("#")[0])[1:]
    raise AssertionError(f"no README line with {fragment!r}")


@pytest.mark.default_model
def test_readme_demo_shows_early_exits_from_a_temp_folder(tmp_path):
    argv = readme_line("--show-exits")
    r = cli(argv, tmp_path, env={"NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr[-1500:]
    m = re.search(r"([\d.]+)/30 layers per token", r.stderr)  # the stats line
    assert m, r.stderr[-1500:]
    assert float(m.group(1)) < 30, r.stderr[-1500:]


@pytest.mark.default_model
def test_no_color_show_exits_through_a_pipe_has_no_escape_codes(tmp_path):
    cmd = (f"NO_COLOR=1 {shlex.quote(sys.executable)} -m cee_gen.cli --exit policy --show-exits Hi "
           "--max-new-tokens 16 2>&1 | cat -v")
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and r.stdout.strip()
    assert "^[" not in r.stdout and ESC not in r.stdout, r.stdout[-1500:]


@pytest.mark.slow
@pytest.mark.default_model
def test_every_readme_command_line_runs_from_a_temp_folder(tmp_path):
    """Each `cee-generate` line of the README, as written (a few tokens only), from a folder that is not
    the repository: status 0, an answer, no traceback. `--input prompts.jsonl` gets such a file there."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi"}\n{"prompt": "Name a colour."}\n')
    lines = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("cee-generate ") or "| cee-generate" in line]
    assert len(lines) >= 10
    for line in lines:
        stdin = None
        if "|" in line:  # echo "..." | cee-generate -
            producer, line = line.split("|")
            stdin = shlex.split(producer)[1] + "\n"
        argv = shlex.split(line)[1:] + ["--max-new-tokens", "4"]
        r = cli(argv, tmp_path, env={"NO_COLOR": "1"}, input=stdin)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (line, r.stderr[-1500:])
        assert r.stdout.strip() or "--output" in line, line
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
