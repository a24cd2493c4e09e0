"""Progress on stderr: one bar on a terminal; elsewhere (a log file, a pipe, CI) a few plain lines, since
a bar's carriage returns turn into one long unreadable line there."""

from __future__ import annotations

import sys


class Progress:
    """`total` steps: a tqdm bar when stderr is a terminal, else a plain line at each `lines`-th of the way
    and at the end ("desc: 9/45 run (alpaca/test full)"). Off entirely with enabled=False."""

    def __init__(self, total: int, desc: str, unit: str = "", lines: int = 5, enabled: bool = True,
                 stream=None):
        self.total, self.desc, self.unit, self.done, self.postfix = total, desc, unit, 0, ""
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.marks = {round(total * i / lines) for i in range(1, lines + 1)} if lines > 0 else {total}
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit or "it", file=self.stream, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.done += n
        self.postfix = postfix or self.postfix
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
        elif self.enabled and self.done in self.marks:
            unit = f" {self.unit}" if self.unit else ""
            tail = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.done}/{self.total}{unit}{tail}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
