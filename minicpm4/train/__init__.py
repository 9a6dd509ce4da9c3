"""Training pieces (issue 3; spec minicpm4-system.md §5.1-5.2, anchors Part B §1): typed configs
(`config.py`), μP-aware AdamW parameter groups (`optim.py`, reading `model/mup.py`) and the WSD
learning-rate schedule (`schedule.py`)."""
