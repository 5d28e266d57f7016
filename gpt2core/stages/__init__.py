"""Pipeline stages: one module per stage, each a plain function run(...) -> StageResult.

A stage module holds only the stage's I/O wiring (artifact URIs, tracking, CLI flags); the work
itself lives in the library (gpt2core.data, gpt2core.model, gpt2core.training, ...).
"""
