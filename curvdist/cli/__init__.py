"""Command line interface and YAML configs."""
