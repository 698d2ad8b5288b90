"""The last reports, kept on disk so the Report tab's charts survive a restart.

One JSON object a line in `<data>/reports.jsonl`, appended as each generation ends (one
`write` of a whole line, so a crash loses at most the line being written). The file is
cut back to the newest `keep` lines when it has grown to twice that, so it stays small
(a report is ~3 KB: 200 of them ~0.6 MB). A line that cannot be read (an older format, a
torn write) is skipped with a log line: this is a cache of what the PNGs' JSON files hold.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from studio.report import Report

log = logging.getLogger(__name__)
KEEP = 200


class ReportHistory:
    """Reports oldest first, in memory and in `path` (None: in memory only). Thread-safe."""

    def __init__(self, path: Path | None, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep
        self._lock = threading.Lock()
        self._reports: deque[Report] = deque(maxlen=keep)
        self._lines = 0
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as err:
            log.warning("report history %s could not be read (%s); starting empty", path, err)
            return
        self._lines = len(lines)  # at most ~2 x keep: append cuts the file back
        for number, line in enumerate(lines, 1):
            try:
                self._reports.append(Report.from_dict(json.loads(line)))
            except (ValueError, TypeError) as err:
                log.info("report history %s line %d skipped: %s", path, number, err)

    def append(self, report: Report) -> None:
        with self._lock:
            self._reports.append(report)
            if self.path is None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(report.to_dict(), separators=(",", ":")) + "\n")
                self._lines += 1
                if self._lines >= 2 * self.keep:
                    self._compact()
            except OSError as err:  # a full or read-only disk must not fail the generation that just ended
                log.warning("report history %s not written: %s", self.path, err)

    def _compact(self) -> None:
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        partial.write_text("".join(json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in self._reports),
                           encoding="utf-8")
        os.replace(partial, self.path)
        self._lines = len(self._reports)

    def __iter__(self) -> Iterator[Report]:
        with self._lock:
            return iter(list(self._reports))

    def __len__(self) -> int:
        with self._lock:
            return len(self._reports)

    def __getitem__(self, index: int) -> Report:
        with self._lock:
            return self._reports[index]

    def __bool__(self) -> bool:
        return len(self) > 0
