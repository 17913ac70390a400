"""Small helpers every layer uses: image encoding and rank-aware logging."""
