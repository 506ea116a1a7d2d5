"""Entropy-mechanism analysis (arXiv 2505.22617): the entropy-dynamics probe, the entropy law
R = -a exp(H) + b, validation and plots. docs/analysis.md explains each metric and figure.

The plots live in megatron_rl.analysis.plots (imported on demand: it loads matplotlib).
"""
from megatron_rl.analysis.entropy_law import (EntropyLawFit, PrefixPrediction,
                                              entropy_accuracy_points, entropy_law_metrics,
                                              fit_entropy_law, predict_from_prefix)
from megatron_rl.analysis.probe import (EntropyProbe, load_probes, probe_batch_logits,
                                        probe_entropy_dynamics, save_probe)

__all__ = ["EntropyLawFit", "PrefixPrediction", "entropy_accuracy_points", "entropy_law_metrics",
           "fit_entropy_law", "predict_from_prefix", "EntropyProbe", "load_probes",
           "probe_batch_logits", "probe_entropy_dynamics", "save_probe"]
