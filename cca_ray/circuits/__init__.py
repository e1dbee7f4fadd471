"""Weight-sparse transformers with interpretable circuits (Gao et al. 2025)."""
