"""File-system helpers shared by the writers (PEFT adapters, merged checkpoints)."""

__all__ = ["quietly"]


def quietly(action, *args, **kwargs):
    """Run a clean-up step; True if it worked.  A failure must not hide the error being raised."""
    try:
        action(*args, **kwargs)
    except OSError:
        return False
    return True
