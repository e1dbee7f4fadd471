"""The built-in world: its templates, general-knowledge tasks, tokenizer and tiny model."""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "templates"
