"""sitfuse-byol."""
