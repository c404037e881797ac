"""An adapter config using a base class that only a future vlm-config has.

Under vlm-config 0.1 this import fails; `vlm plugins` must report the plugin as
incompatible from its metadata alone, without importing this module.
"""

from __future__ import annotations

from typing import Literal

from vlm_config import FutureAdapterBase  # type: ignore[attr-defined]  # vlm-config 0.2


class FutureAdapterConfig(FutureAdapterBase):  # type: ignore[misc]
    type: Literal["fixture_future"] = "fixture_future"
