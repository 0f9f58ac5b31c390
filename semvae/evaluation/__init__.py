"""Evaluation of trained VAEs (docs/METHOD.md): ``metrics`` (pure functions), ``morpho`` (the morphometric judge),
``suite`` (every metric of one model against a fixed bench), ``report`` (the table and figures it writes)."""
