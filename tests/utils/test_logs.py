"""Logging: library lines that quote a whole prompt are cut; the tool's own lines are not."""

from __future__ import annotations

import logging

from spmd_diffusion.utils.logs import MAX_LIBRARY_LINE, setup_logging


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_library_line_quoting_a_long_prompt_is_cut(monkeypatch):
    monkeypatch.setattr(
        logging, "_logRecordFactory", logging.getLogRecordFactory()
    )  # restored afterwards
    setup_logging(0)
    setup_logging(0)  # idempotent: one cut, not two
    keep = Keep()
    library, own = (
        logging.getLogger("diffusers.pipelines.test"),
        logging.getLogger("spmd_diffusion.test"),
    )
    for logger in (library, own):
        logger.addHandler(keep)
    try:
        library.warning("truncated because CLIP can only handle 77 tokens: %s", "x" * 9000)
        own.warning("%s", "y" * 9000)
    finally:
        for logger in (library, own):
            logger.removeHandler(keep)
    cut, whole = keep.lines
    assert cut.startswith("truncated because CLIP") and len(cut) < MAX_LIBRARY_LINE + 40
    assert cut.endswith(
        f"({len('truncated because CLIP can only handle 77 tokens: ') + 9000 - MAX_LIBRARY_LINE} "
        "characters more)"
    )
    assert whole == "y" * 9000
