"""Quiet imports: transformers ≥ 5 without torchvision logs a note the first time a pipeline module of diffusers
imports an image processor (``CLIPImageProcessor``, ``SiglipImageProcessor``: "requires torchvision (not
installed); falling back to ...Pil"). attnprobe imports diffusers' pipelines only inside its builders and loader; those
run under ``quiet_notes``, which drops that one note of ``transformers.utils.import_utils`` while they run and
leaves transformers' logging (its level, its other messages, the user's own imports later) as it was.

    >>> with quiet_notes():
    ...     pass
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["quiet_notes"]

#: the logger transformers writes the note with, and the words it starts with
_LOGGER = "transformers.utils.import_utils"
_NOTE = "requires torchvision (not installed); falling back to"


class _DropNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOTE not in record.getMessage()


class quiet_notes(contextlib.ContextDecorator):
    """Drop transformers' torchvision fallback note while the block (or the decorated function) runs."""

    def __enter__(self):
        self._filter = _DropNote()
        logging.getLogger(_LOGGER).addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        logging.getLogger(_LOGGER).removeFilter(self._filter)
        return False
