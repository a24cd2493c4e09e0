"""The engine: the decode loop (loop.py), the plain and compiled steps (decoder.py), the early-exit step
(exit_step.py) and per-token telemetry (telemetry.py). docs/architecture.md walks one step through."""

from cee_gen.engine.decoder import Decoder
from cee_gen.engine.exit_step import ExitRun, ExitStep
from cee_gen.engine.loop import generate_batch
from cee_gen.engine.telemetry import BatchTimings, RowOutput, exit_histogram

__all__ = ["BatchTimings", "Decoder", "ExitRun", "ExitStep", "RowOutput", "exit_histogram", "generate_batch"]
