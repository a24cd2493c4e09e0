"""cee-generate end to end on a tiny checkpoint: text, --json, stdin, --input/--output, errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli


def test_prints_generated_text(tiny_dir, capsys):
    code, out, err = run_cli(["--model", str(tiny_dir), "--max-new-tokens", "8", "the quick"], capsys)
    assert code == 0 and out.strip() and "tok/s" in err


def test_json_output_has_text_token_ids_and_stats(tiny_dir, capsys):
    argv = ["--model", str(tiny_dir), "--max-new-tokens", "6", "--json", "a b", "z"]
    code, out, _ = run_cli(argv, capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2
    for r in rows:
        assert {"text", "token_ids", "stats"} <= r.keys()
        n, s = len(r["token_ids"]), r["stats"]
        assert 1 <= n <= 6 and s["generated_tokens"] == n
        # decode speed counts the tokens after the first (which comes from the prefill)
        assert s["decode_tokens_per_s"] == (pytest.approx((n - 1) / s["decode_s"]) if n > 1 else 0.0)


def test_cli_matches_api(tiny_dir, tiny_model, capsys):
    import cee_gen

    _, out, _ = run_cli(["--model", str(tiny_dir), "--max-new-tokens", "12", "--raw", "--json",
                         "the quick brown"], capsys)
    [r] = cee_gen.generate(tiny_model, "the quick brown", max_new_tokens=12, chat=False)
    assert json.loads(out)["token_ids"] == r.token_ids


def test_input_output_jsonl_keeps_extra_fields(tiny_dir, tmp_path, capsys):
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": 1, "prompt": "a b"}\n\n{"id": 2, "prompt": "the fox"}\n')
    code, _, err = run_cli(["--model", str(tiny_dir), "--max-new-tokens", "5", "--input", str(inp),
                            "--output", str(outp)], capsys)
    rows = [json.loads(line) for line in outp.read_text().splitlines()]
    assert code == 0 and [r["id"] for r in rows] == [1, 2] and "wrote 2 results" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_failed_run_leaves_no_output_file(tiny_dir, tmp_path, capsys):
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    code, _, err = run_cli(["--model", str(tiny_dir), "--input", str(inp), "--output", str(outp)],
                           capsys)
    assert code == 2 and 'no "prompt" string' in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_interrupt_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    from cee_gen import cli

    target = tmp_path / "out.jsonl"

    def boom(*a, **k):
        raise KeyboardInterrupt

    class Lines(list):
        def __iter__(self):
            yield "first"
            boom()

    with pytest.raises(KeyboardInterrupt):
        cli._write_atomic(target, Lines(["first", "second"]))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, words", [
    (["--max-new-tokens", "-5", "hi"], "max_new_tokens"),
    (["--top-p", "0", "hi"], "top_p"),
    (["--do-sample", "--temperature", "0", "hi"], "temperature"),
    (["--dtype", "float8", "hi"], "dtype"),
    (["--device", "tpu", "hi"], "device"),
    ([], "no prompt given"),
    (["--model", "/no/such/model", "hi"], "does not exist"),
    # conflicts are refused, not silently resolved
    (["--raw", "--chat", "hi"], "not allowed with argument"),
    (["--json", "--stream", "hi"], "drop --stream or the other"),
    (["--output", "out.jsonl", "--stream", "hi"], "drop --stream or the other"),
    (["--show-exits", "--stream", "hi"], "cannot --stream"),
    (["--exit", "full", "--kv-fill", "copy-kv", "hi"], "no KV to fill"),
    (["--exit", "entropy", "--min-exit-layer", "40", "hi"], "leaves no layer to exit at"),
    (["--exit", "entropy", "--exit-layers", "1", "--min-exit-layer", "2", "hi"], "exits would never"),
    (["--temperature", "-1", "hi"], "temperature must be > 0"),
    (["--seed", "-1", "hi"], "seed must be an integer"),
])
def test_bad_flags_exit_2_with_one_line_error(tiny_dir, argv, words, capsys):
    if "--model" not in argv:
        argv = ["--model", str(tiny_dir), *argv]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_stdin_prompt_through_the_installed_command(tiny_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "cee_gen.cli", "--model", str(tiny_dir), "--max-new-tokens", "5",
         "--json", "-"], input="the quick brown fox", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) >= 1


def test_help_shows_examples(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "examples:" in out and "--max-new-tokens" in out and "--raw" in out


def _cli(tiny_dir, *argv, stdin=b""):
    return subprocess.run([sys.executable, "-m", "cee_gen.cli", "--model", str(tiny_dir), "--max-new-tokens",
                           "3", *argv], input=stdin, capture_output=True, timeout=120)


def test_non_utf8_stdin_and_arguments_get_one_line_errors_naming_the_byte(tiny_dir):
    for proc, where in ((_cli(tiny_dir, "-", stdin=b"Hello \xff\xfe world\n"), "stdin"),
                        (_cli(tiny_dir, b"Hello \xff world"), "prompt argument 1")):
        err = proc.stderr.decode()
        assert proc.returncode == 2 and f"{where} is not valid UTF-8 (byte 7, 0xff)" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_non_utf8_input_line_names_its_file_and_line(tiny_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "fine"}\n{"prompt": "bad \xc3"}\n')
    code, _, err = run_cli(["--model", str(tiny_dir), "--input", str(src), "--output",
                            str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and f"{src}:2 is not valid UTF-8" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_api_refuses_text_with_lone_surrogates_in_one_line(tiny_model):
    import cee_gen

    with pytest.raises(cee_gen.CeeGenError, match="prompt 1 is not valid text.*character 4"):
        cee_gen.generate(tiny_model, ["fine", "bad \udcff"], max_new_tokens=2)


def test_overwriting_an_output_file_keeps_its_permissions(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    out.chmod(0o600)
    code, _, _ = run_cli(["--model", str(tiny_dir), "--max-new-tokens", "2", "--output", str(out), "hi"],
                         capsys)
    assert code == 0 and json.loads(out.read_text())["text"] is not None
    assert out.stat().st_mode & 0o777 == 0o600
