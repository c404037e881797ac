"""``joint_decoder``: visual tokens prepended to the text (LLaVA-style)."""
