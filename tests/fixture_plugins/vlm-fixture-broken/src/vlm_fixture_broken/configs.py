"""Raises on import, like a plugin built against an incompatible core."""

raise RuntimeError("vlm-fixture-broken is deliberately broken")
