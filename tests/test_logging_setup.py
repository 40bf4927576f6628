"""Progress bars: --quiet / HISTODD_NO_PROGRESS / TQDM_DISABLE all turn them off, even when a caller passes disable=False."""

from histodd_fed.logging_setup import progress, progress_enabled


def test_progress_bars_honour_every_off_switch(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("HISTODD_NO_PROGRESS", "0")
    assert progress_enabled()
    assert not progress(range(3), disable=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress_enabled()
    assert progress(range(3), disable=False).disable
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("HISTODD_NO_PROGRESS", "1")
    assert progress(range(3), disable=False).disable
