"""Training pieces (issue 3; spec minicpm4-system.md §5.1-5.2, anchors Part B §1-§2): typed
configs (`config.py`, `recipe.py`), μP-aware AdamW parameter groups (`optim.py`, reading
`model/mup.py`), the WSD learning-rate schedule (`schedule.py`), one training step (`step.py`),
the loop (`loop.py`) and atomic, exactly resumable checkpoints (`checkpoint.py`)."""
