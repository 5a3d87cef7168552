"""``tureen doctor``: check the host before serving, and say what to fix."""
