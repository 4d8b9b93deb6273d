"""Built-in plugins of distill. Each subpackage is an entry point in our own pyproject."""
