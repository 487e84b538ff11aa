"""Looking inside models: hooks and an activation cache, attention maps, attribution,
probing with control tasks, logit and tuned lenses, activation patching and causal
tracing, and the vanishing-gradient diagnostics. Lessons 2 and 11 to 13 use them."""

from lmlab.interp.attention import attention_maps, attention_rollout, plot_attention, plot_rollout
from lmlab.interp.attribution import (
    attribute,
    attribute_prompt,
    gradient_x_input,
    integrated_gradients,
    next_token_score,
    occlusion,
    saliency,
    value_score,
)
from lmlab.interp.gradients import (
    plot_vanishing_gradients,
    trained_gradients,
    vanishing_gradients,
)
from lmlab.interp.heatmap import heatmap_html, plot_heatmap, save_heatmap_html
from lmlab.interp.hooks import ActivationCache, hook_points, hooks, match_names, run_with_cache
from lmlab.interp.lens import TunedLens, logit_lens, train_tuned_lens, tuned_lens
from lmlab.interp.patching import causal_trace, ioi_pairs, make_pairs, patch_heads, patch_residual
from lmlab.interp.probing import collect, control_labels, selectivity, sweep

__all__ = [
    "ActivationCache",
    "TunedLens",
    "attention_maps",
    "attention_rollout",
    "attribute",
    "attribute_prompt",
    "causal_trace",
    "collect",
    "control_labels",
    "gradient_x_input",
    "heatmap_html",
    "hook_points",
    "hooks",
    "integrated_gradients",
    "ioi_pairs",
    "logit_lens",
    "make_pairs",
    "match_names",
    "next_token_score",
    "occlusion",
    "patch_heads",
    "patch_residual",
    "plot_attention",
    "plot_heatmap",
    "plot_rollout",
    "plot_vanishing_gradients",
    "run_with_cache",
    "saliency",
    "save_heatmap_html",
    "selectivity",
    "sweep",
    "train_tuned_lens",
    "tuned_lens",
    "value_score",
    "trained_gradients",
    "vanishing_gradients",
]
