"""Evaluation stage: zero-shot classification, retrieval, linear probe and classification accuracy on
any checkpoint reference, plus export. Imports without Ray or DeepSpeed.

Entry points: `resolver.resolve(ref, model_name)` -> ResolvedModel, `tasks.evaluate(task, resolved,
data_dir, options)` -> result record, `export.export(resolved, fmt, path)`.
"""
