"""Progress bars that show only on a terminal: a log redirected to a file gets the stages' one-line
summaries (``logging``), never thousands of carriage-return updates."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar shown when ``enabled`` *and* stderr is a terminal (tqdm's ``disable=None``)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=None if enabled else True, leave=False, **kwargs)
