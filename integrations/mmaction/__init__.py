"""MMAction2 adapter (placeholder until the plugin lands)."""
