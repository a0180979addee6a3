"""vpeft.modules (filled by later issues)."""
