"""Monitoring: what the drift job measures on live traffic and how it compares with a reference.

- `groups`: the model's inputs as named feature groups, and an exact group-level SHAP explainer
  (a hidden group takes its background value);
- `shift`: the importance distribution (normalised mean |SHAP| per group), the total variation
  distance between two of them, and its bootstrap noise;
- `reference`: the reference set a model is compared against (built from held-out splits);
- `summary`: handcrafted-feature summaries, the Evidently data-drift report and the plots.

`tasks.drift` wires them to the prediction store and the model bundle.
"""
