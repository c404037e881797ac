"""Test fixture plugin duplicating a name."""
