"""Early exit: exit heads (heads.py), strategies (strategies.py), quick head fitting (quickfit.py)."""

from cee_gen.exits.heads import ExitHeads, HeadsFileError, load_heads
from cee_gen.exits.strategies import Signals, Strategy, make_strategy

__all__ = ["ExitHeads", "HeadsFileError", "load_heads", "Signals", "Strategy", "make_strategy"]
