"""Test fixture plugin written against vlm-config 0.2 (never imported under 0.1)."""
