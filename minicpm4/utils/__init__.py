"""Small helpers shared by every room (architecture §3 `utils/`): `dist.py` (torch.distributed)."""
