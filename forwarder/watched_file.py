"""A file read again every poll cycle (`ip.txt`, `API_KEYS_FILE`): its text when it changed, and
the last good text kept, with the error logged, while it cannot be read."""

import logging

log = logging.getLogger(__name__)


class WatchedFile:
    """One file, as its reader last saw it."""

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        self.text = None

    def changed(self) -> "str | None":
        """The file's text if it differs from the last reading, else None (unchanged, or
        unreadable: then the last good text stays)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            log.error("cannot read %s %s (%s); keeping the last good one", self.what, self.path,
                      exc.strerror or exc)
            return None
        if text == self.text:
            return None
        self.text = text
        return text
