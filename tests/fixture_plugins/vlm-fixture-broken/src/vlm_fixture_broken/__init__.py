"""Test fixture plugin that fails to import its config module."""
