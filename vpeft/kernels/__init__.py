"""vpeft.kernels (filled by later issues)."""
