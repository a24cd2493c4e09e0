"""`cee-train`: the command line over cee_gen.train.trainer.train; flags are TrainConfig's fields."""

from __future__ import annotations

from cee_gen.cli import config_from, config_parser, exit_with
from cee_gen.train.config import TrainConfig

EXAMPLES = """\
examples:
  cee-train --out heads.safetensors                               # default model, Alpaca, stages 1,2,3
  cee-train --dataset dolly --max-examples 500 --alpha 0.05 --out dolly.safetensors
  cee-train --stages 2 --adapter-rank 0 --exit-layers every:2 --out policy-only.safetensors
  cee-generate --exit policy --heads heads.safetensors --show-exits "Hi"   # use them
"""


def build_parser():
    return config_parser("cee-train", "Train exit heads and a ConsistentEE policy for a model.", EXAMPLES,
                         TrainConfig)


def main(argv: list[str] | None = None) -> None:
    def body() -> int:
        args = build_parser().parse_args(argv)
        cfg = config_from(args, TrainConfig).validate()
        from cee_gen.train.trainer import train

        train(cfg)
        return 0

    exit_with("cee-train", body, process=argv is None)


if __name__ == "__main__":
    main()
