"""The label convention shared by the data (which writes labels) and the model and trainer (which read them).

labels int32[B, T] align with the input ids; IGNORE marks a position whose token is not trained (prompt, image
placeholder, padding).
"""
from __future__ import annotations

IGNORE = -100  # torch's CrossEntropyLoss ignore_index, as LLaVA's data code writes it
