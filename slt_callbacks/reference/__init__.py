"""Reference problems whose answers are known in advance, to check the monitors against.

:mod:`slt_callbacks.reference.saddle`: saddle-to-saddle learning in a deep linear network
(loss drops one teacher mode at a time; the final minimum has a closed-form λ).
Torch only.
"""

from .saddle import DeepLinearNet, SaddleProblem, loss_drop_steps, teacher_matrix

__all__ = ["DeepLinearNet", "SaddleProblem", "loss_drop_steps", "teacher_matrix"]
