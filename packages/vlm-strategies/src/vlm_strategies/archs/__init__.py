"""First-party archs, each a plugin registered through the `vlm.archs` entry points."""
