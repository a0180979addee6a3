"""vpeft.datasets (filled by later issues)."""
