"""cca-ray: Constructive Circuit Amplification over many base models, on Ray."""

__version__ = "0.1.0"
