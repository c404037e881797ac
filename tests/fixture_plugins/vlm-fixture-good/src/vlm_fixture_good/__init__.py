"""Test fixture plugin (torch-free configs only)."""
