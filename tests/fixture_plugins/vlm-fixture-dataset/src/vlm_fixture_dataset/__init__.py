"""Test fixture: a dataset plugin living outside the toolkit's packages."""
