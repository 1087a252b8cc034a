"""Planning, pure Python: model specs, memory estimates, recommendations, dataset profiles.

Nothing in this package imports torch, transformers or gradio: a plan for a
70B model must take milliseconds and work on a machine with none of them.
"""
